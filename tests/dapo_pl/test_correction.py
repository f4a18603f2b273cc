"""Rollout correction (TIS weights, MIS / IcePop masks) against a float64 reference written with plain loops.

The reference (``ref_*``) uses Python floats and ``math.exp`` only, straight from the formulas in
docs/rollout-correction.md: the rollout ratio ``rho_t = pi_old_trainer(y_t) / pi_engine(y_t)``, the sequence
ratio as the product ``prod_t rho_t`` (multiplied token by token, not summed in log space), TIS
``w = min(rho, clip)``, MIS ``keep = low <= rho <= high``, the token-mean over the kept tokens only, and the
effective sample size ``(sum w)^2 / (N sum w^2)``. Tolerances are 1e-10 in float64.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

# Helpers of the sibling test modules (pytest puts tests/dapo_pl on sys.path): their tiny float64 transformer
# and batch (test_update), their scripted engine, 1-vs-2-rank fit and comparison (test_distributed).
from test_distributed import ScriptedEngine, _assert_same_update, _fit, tiny  # noqa: F401
from test_update import _batch, _cast, _perturb, _policy

from dapo_pl.objective import (
    combine_correction_sums,
    mis_keep_mask,
    policy_loss,
    rollout_correction,
    rollout_correction_metrics,
    rollout_correction_sums,
    rollout_log_ratio,
    tis_weights,
    token_mean_denominator,
)

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
MODES = ("off", "tis", "mis", "both")
LEVELS = ("token", "sequence")
EPS_LOW, EPS_HIGH = 0.2, 0.28


# ---------------------------------------------------------------------------------------------------------
# The loop reference.
# ---------------------------------------------------------------------------------------------------------


def ref_correction(old, engine, engine_mask, loss_mask, *, mode, level, clip, low, high):
    """Per-token TIS weights and the corrected loss mask, from loops over Python floats."""
    weights, mask = [], []
    for i, row in enumerate(engine_mask):
        ratios = [math.exp(old[i][t] - engine[i][t]) if row[t] else 1.0 for t in range(len(row))]
        seq = 1.0
        for t, has in enumerate(row):
            if has:
                seq *= ratios[t]  # the product of the response's token ratios
        w_row, m_row = [], []
        for t, has in enumerate(row):
            unit = ratios[t] if level == "token" else seq
            w_row.append(min(unit, clip) if has and mode in ("tis", "both") else 1.0)
            keep = (low <= unit <= high) if has and mode in ("mis", "both") else True
            m_row.append(bool(loss_mask[i][t]) and keep)
        weights.append(w_row)
        mask.append(m_row)
    return weights, mask


def ref_ppo_token(logp: float, old: float, a: float) -> tuple[float, float]:
    """One token's PPO loss ``-min(r A, clip(r) A)`` and its derivative in ``logp`` (A r where unclipped)."""
    r = math.exp(logp - old)
    clipped = min(max(r, 1.0 - EPS_LOW), 1.0 + EPS_HIGH)
    unclipped_active = r * a <= clipped * a
    return -min(r * a, clipped * a), (-a * r if unclipped_active else 0.0)


def ref_corrected_loss(logprobs, old, adv, weights, mask):
    """Token-mean of ``w_t * loss_t`` over the kept tokens (the kept tokens are the denominator), and its gradient."""
    count = max(sum(sum(1 for m in row if m) for row in mask), 1)
    loss, grad = 0.0, []
    for i, row in enumerate(mask):
        grad_row = []
        for t, m in enumerate(row):
            if not m:
                grad_row.append(0.0)
                continue
            value, dvalue = ref_ppo_token(logprobs[i][t], old[i][t], adv[i])
            loss += weights[i][t] * value / count
            grad_row.append(weights[i][t] * dvalue / count)
        grad.append(grad_row)
    return loss, grad


def ref_metrics(old, engine, engine_mask, loss_mask, *, mode, level, clip, low, high):
    """The five rollout/* metrics straight from their definitions."""
    token_ratios, seq_ratios = [], []
    for i, row in enumerate(engine_mask):
        ratios = [math.exp(old[i][t] - engine[i][t]) for t, has in enumerate(row) if has and loss_mask[i][t]]
        token_ratios += ratios
        if ratios:
            seq_ratios.append(math.prod(ratios))
    units = token_ratios if level == "token" else seq_ratios
    n = len(seq_ratios)
    return {
        "rollout/is_ratio_mean": sum(units) / len(units),
        "rollout/is_ratio_max": max(units),
        "rollout/is_truncated_frac": sum(u > clip for u in units) / len(units)
        if mode in ("tis", "both")
        else 0.0,
        "rollout/masked_frac": sum(not low <= u <= high for u in units) / len(units)
        if mode in ("mis", "both")
        else 0.0,
        "rollout/ess": sum(seq_ratios) ** 2 / (n * sum(w * w for w in seq_ratios)),
    }


def make_case(seed: int, batch: int = 10, length: int = 12):
    """Float64 inputs: trainer old log-probs, engine log-probs off by up to +-0.9 nats per token, current
    log-probs around the old ones; row 1 is a carried-over row (no engine log-probs, garbage in them), row 2 is
    right-padded, row 3 has no loss token (overlong-filtered)."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(batch, length, generator=g, dtype=F64)  # [B, T]
    engine = old + 0.9 * (2.0 * torch.rand(batch, length, generator=g, dtype=F64) - 1.0)  # [B, T]
    logprobs = old + 0.6 * (2.0 * torch.rand(batch, length, generator=g, dtype=F64) - 1.0)  # [B, T]
    adv = torch.randn(batch, generator=g, dtype=F64)  # [B]
    loss_mask = torch.ones(batch, length, dtype=F64)  # [B, T]
    loss_mask[:, :2] = 0.0  # prompt positions
    loss_mask[2, length // 2 :] = 0.0
    loss_mask[3] = 0.0
    engine_mask = loss_mask.clone()  # [B, T]
    engine_mask[3] = 1.0 - engine_mask[3]  # engine log-probs exist, but the row is filtered from the loss
    engine_mask[3, :2] = 0.0
    engine_mask[1] = 0.0
    engine[1] = 1e6  # a carried-over row: whatever is there must not matter
    return logprobs, old, engine, engine_mask, adv, loss_mask


def settings(level: str) -> dict[str, float]:
    # Sequence ratios spread far wider than token ratios: wider bounds, so both sides of each are hit.
    return (
        {"clip": 2.0, "low": 0.5, "high": 2.0} if level == "token" else {"clip": 3.0, "low": 0.3, "high": 3.0}
    )


# ---------------------------------------------------------------------------------------------------------
# Values and gradients against the reference.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
def test_corrected_loss_matches_loop_reference(seed: int, level: str, mode: str) -> None:
    logprobs, old, engine, engine_mask, adv, loss_mask = make_case(seed)
    kw = settings(level)
    weights, mask = rollout_correction(old, engine, engine_mask, loss_mask, mode=mode, level=level, **kw)
    ref_w, ref_mask = ref_correction(old.tolist(), engine.tolist(), engine_mask.tolist(), loss_mask.tolist(),
                                     mode=mode, level=level, **kw)  # fmt: skip
    torch.testing.assert_close(weights, torch.tensor(ref_w, dtype=F64), **TOL)
    assert mask.dtype == loss_mask.dtype and (mask != 0).tolist() == ref_mask

    # The random case exercises both sides of every bound it uses.
    if mode in ("tis", "both"):
        on_loss = weights[loss_mask != 0]
        at_clip = (on_loss - kw["clip"]).abs() < 1e-12
        assert at_clip.any() and (on_loss < kw["clip"] - 1e-3).any()
    if mode in ("mis", "both"):
        assert (mask != loss_mask).any() and (mask != 0).any()

    leaf = logprobs.clone().requires_grad_(True)
    num_tokens = token_mean_denominator(mask)  # the MIS mask is applied before the denominator is counted
    loss = policy_loss(leaf, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, num_tokens=num_tokens,
                       is_weights=weights)  # fmt: skip
    loss.backward()
    ref_loss, ref_grad = ref_corrected_loss(logprobs.tolist(), old.tolist(), adv.tolist(), ref_w, ref_mask)
    torch.testing.assert_close(loss.detach(), torch.tensor(ref_loss, dtype=F64), **TOL)
    torch.testing.assert_close(leaf.grad, torch.tensor(ref_grad, dtype=F64), **TOL)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
def test_metrics_match_loop_reference_and_reduce_over_micro_batches(level: str, mode: str) -> None:
    """Sums per micro-batch (or per rank), combined, give the whole batch's metrics: means are sums over
    counts, the maximum is a max, the ESS is built from summed w and w^2."""
    _, old, engine, engine_mask, _, loss_mask = make_case(0)
    kw = settings(level)
    args = (old, engine, engine_mask, loss_mask)
    whole = rollout_correction_metrics(rollout_correction_sums(*args, mode=mode, level=level, **kw))
    ref = ref_metrics(*(t.tolist() for t in args), mode=mode, level=level, **kw)
    assert whole.keys() == ref.keys()
    for key, value in ref.items():
        assert whole[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    if mode != "off":
        assert 0 < whole["rollout/is_truncated_frac"] + whole["rollout/masked_frac"] < 1
    assert whole["rollout/ess"] < 1 and whole["rollout/is_ratio_max"] > 1.5

    parts = [slice(0, 1), slice(1, 4), slice(4, 10)]  # uneven; the first part holds no engine token at all
    sums = [rollout_correction_sums(*(t[p] for t in args), mode=mode, level=level, **kw) for p in parts]
    combined = rollout_correction_metrics(combine_correction_sums(sums))
    for key, value in whole.items():
        assert combined[key] == pytest.approx(value, rel=1e-12), key
    # Averaging the per-part metrics instead (the bug class) gives other numbers.
    naive = [rollout_correction_metrics(s) for s in sums[1:]]
    assert abs(sum(m["rollout/ess"] for m in naive) / 2 - whole["rollout/ess"]) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases (the docstrings' numbers).
# ---------------------------------------------------------------------------------------------------------


def test_hand_worked_ratio_tis_and_mis() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    engine = torch.tensor([[-1.5, -1.0, -1.5]], dtype=F64)
    ones = torch.ones(1, 3, dtype=F64)
    log_ratio = rollout_log_ratio(old, engine, ones)
    torch.testing.assert_close(log_ratio, torch.tensor([[0.5, -1.0, 1.0]], dtype=F64), **TOL)
    token = tis_weights(log_ratio, ones, level="token", clip=2.0)
    torch.testing.assert_close(token, torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0]], dtype=F64), **TOL)
    seq = tis_weights(log_ratio, ones, level="sequence", clip=2.0)  # e^(0.5 - 1 + 1) = 1.6487 < 2
    torch.testing.assert_close(seq, torch.full((1, 3), math.exp(0.5), dtype=F64), **TOL)
    assert mis_keep_mask(log_ratio, ones, level="token", low=0.5, high=2.0).tolist() == [[True, False, False]]
    assert mis_keep_mask(log_ratio, ones, level="sequence", low=0.5, high=2.0).tolist() == [[True] * 3]
    # A long response: the product overflows a float, the truncated weight does not.
    long = torch.full((1, 5000), 0.1, dtype=F64)  # prod = e^500
    long_w = tis_weights(long, torch.ones_like(long), level="sequence", clip=2.0)
    torch.testing.assert_close(long_w, torch.full_like(long, 2.0), **TOL)
    sums = rollout_correction_sums(long, torch.zeros_like(long), torch.ones_like(long), torch.ones_like(long),
                                   mode="both", level="sequence")  # fmt: skip
    metrics = rollout_correction_metrics(sums)
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["rollout/masked_frac"] == 1.0


def test_hand_worked_ess_and_empty_metrics() -> None:
    """Three one-token responses with ratios 1, 1, 4: ESS = (1 + 1 + 4)^2 / (3 (1 + 1 + 16)) = 36 / 54."""
    old = torch.log(torch.tensor([[1.0], [1.0], [4.0]], dtype=F64))
    ones = torch.ones(3, 1, dtype=F64)
    metrics = rollout_correction_metrics(
        rollout_correction_sums(old, torch.zeros_like(old), ones, ones, mode="tis", level="token", clip=2.0)
    )
    assert metrics["rollout/ess"] == pytest.approx(36 / 54, rel=1e-12)
    assert metrics["rollout/is_ratio_mean"] == pytest.approx(2.0) and metrics["rollout/is_ratio_max"] == 4.0
    assert (
        metrics["rollout/is_truncated_frac"] == pytest.approx(1 / 3) and metrics["rollout/masked_frac"] == 0
    )
    empty = rollout_correction_sums(old, old, torch.zeros_like(ones), ones, mode="both", level="token")
    assert rollout_correction_metrics(empty) == {}


# ---------------------------------------------------------------------------------------------------------
# Carried-over groups, bad arguments.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_carried_over_rows_are_weighted_1_and_never_masked(level: str) -> None:
    """A carried-over group was sampled one update earlier and its engine log-probs were dropped
    (``rollout_mask`` 0): it is no engine sample of the current old policy, so there is no ratio to correct
    with. It keeps weight 1 and every loss token, whatever the engine tensor holds there, and its loss is the
    uncorrected one."""
    logprobs, old, engine, engine_mask, adv, loss_mask = make_case(4)
    carried = 1
    assert engine_mask[carried].sum() == 0 and loss_mask[carried].sum() > 0
    weights, mask = rollout_correction(old, engine, engine_mask, loss_mask, mode="both", level=level,
                                       clip=1.0, low=1.0, high=1.0 + 1e-9)  # fmt: skip  # the tightest bounds
    assert weights[carried].eq(1.0).all() and torch.equal(mask[carried], loss_mask[carried])
    assert (mask[carried + 1 :] != loss_mask[carried + 1 :]).any()  # the same bounds do mask fresh rows
    rows = slice(carried, carried + 1)
    corrected = policy_loss(logprobs[rows], old[rows], adv[rows], mask[rows], is_weights=weights[rows])
    torch.testing.assert_close(corrected, policy_loss(logprobs[rows], old[rows], adv[rows], loss_mask[rows]))


def test_carried_over_groups_have_no_engine_mask_in_the_micro_batch() -> None:
    """Through the real batch builder: a group marked not fresh (carried over) reaches the micro-batch with
    ``rollout_mask`` 0, so the correction leaves it alone; the fresh group's tokens are corrected."""
    from dapo_pl.batch import collate
    from dapo_pl.data import PromptRecord
    from dapo_pl.datamodule import Group, build_rollout_batch
    from dapo_pl.engines import Completion

    def group(fresh: bool, lp: float) -> Group:
        completions = [Completion([5, 6, 7], "x", False, [lp] * 3), Completion([8, 9], "y", False, [lp] * 2)]
        return Group(PromptRecord("p", "1", "w"), [1, 2], completions, [1.0, 0.0], [True, False], fresh=fresh)

    batch = build_rollout_batch([group(True, -3.0), group(False, -3.0)], 1.0, True, {})
    mb = collate(batch, list(range(4)), 0, torch.ones(4))
    assert mb.rollout_mask[:2].sum() == 5 and mb.rollout_mask[2:].sum() == 0
    old = torch.zeros_like(mb.rollout_logprobs)  # trainer log-prob 0 vs engine -3: ratio e^3 on fresh tokens
    weights, mask = rollout_correction(old, mb.rollout_logprobs, mb.rollout_mask, mb.loss_mask, mode="both")
    assert mask[:2].sum() == 0 and torch.equal(mask[2:], mb.loss_mask[2:])  # fresh rows dropped, carried kept
    torch.testing.assert_close(weights[:2][mb.rollout_mask[:2] != 0], torch.full((5,), 2.0))
    assert weights[2:].eq(1.0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "is"}, "mode must be one of 'off', 'tis', 'mis', 'both'; got 'is'"),
        ({"level": "geometric"}, "level must be one of 'token', 'sequence'"),
        ({"clip": 0.5}, r"clip must be >= 1 .*got 0.5"),
        ({"low": 1.5}, r"0 <= low <= 1 <= high .*low=1.5"),
        ({"high": 0.9}, r"0 <= low <= 1 <= high .*high=0.9"),
        ({"low": 1.0, "high": 1.0}, "must differ"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs: dict, match: str) -> None:
    x = torch.zeros(1, 2)
    args = {"mode": "both", **kwargs}
    with pytest.raises(ValueError, match=match):
        rollout_correction(x, x, x, x, **args)
    with pytest.raises(ValueError, match=r"is_weights must be \[B, T\]"):
        policy_loss(x, x, torch.zeros(1), x + 1, is_weights=torch.ones(2, 2))


def test_config_validates_with_errors_that_name_the_key() -> None:
    from dapo_pl.module import AlgorithmConfig, RolloutCorrectionConfig

    assert AlgorithmConfig().rollout_correction.mode == "off" and AlgorithmConfig().old_logprobs == "trainer"
    with pytest.raises(ValueError, match=r"model.algorithm.rollout_correction: clip must be >= 1"):
        RolloutCorrectionConfig(mode="tis", clip=0.9)
    with pytest.raises(ValueError, match=r"model.algorithm.rollout_correction: mode must be one of"):
        RolloutCorrectionConfig(mode="icepop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"old_logprobs must be 'trainer' or 'engine', got 'rollout'"):
        AlgorithmConfig(old_logprobs="rollout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"old_logprobs='engine' .* nothing to correct"):
        AlgorithmConfig(old_logprobs="engine", rollout_correction=RolloutCorrectionConfig(mode="tis"))


# ---------------------------------------------------------------------------------------------------------
# A real fit with a deliberately mismatched engine.
# ---------------------------------------------------------------------------------------------------------


class NoisyEngine:
    """The real transformers engine, with seeded Gaussian noise (std ``noise`` nats) added to the log-probs it
    reports: a deliberately mismatched engine. The tokens are really sampled by the policy; only the reported
    log-probs are off, as a bf16 engine's are (a GPU with bf16 vLLM, the real case, is not available here)."""

    def __init__(self, tokenizer: Any, noise: float, return_logprobs: bool = True) -> None:
        from dapo_pl.engines.hf import TransformersEngine

        self.inner = TransformersEngine(tokenizer, return_logprobs=return_logprobs)
        self.return_logprobs = return_logprobs
        self.noise = noise
        self.calls = 0

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()

    def generate(self, prompts: list[list[int]], params: Any, seed: int) -> list[list[Any]]:
        out = self.inner.generate(prompts, params, seed)
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        for group in out:
            for c in group:
                if c.logprobs is not None:
                    noise = self.noise * torch.randn(len(c.logprobs), generator=g, dtype=F64)
                    c.logprobs = [lp + float(e) for lp, e in zip(c.logprobs, noise, strict=True)]
        return out


def _recording_module(**kwargs: Any) -> Any:
    from dapo_pl.module import DAPOModule

    class Recording(DAPOModule):
        """Keeps a copy of every micro-batch after its optimizer step (old log-probs, weights, masks)."""

        seen: list[dict[str, torch.Tensor]]
        on_policy: list[bool]

        def _prepare(self, *args: Any, **kw: Any) -> Any:
            mini_batches, on_policy = super()._prepare(*args, **kw)
            self.on_policy.append(on_policy)
            return mini_batches, on_policy

        def _optimizer_step(self, micro_batches: list[Any], *args: Any, **kw: Any) -> dict[str, float]:
            out = super()._optimizer_step(micro_batches, *args, **kw)
            fields = (
                "old_logprobs",
                "rollout_logprobs",
                "rollout_mask",
                "response_mask",
                "loss_mask",
                "is_weights",
            )
            for mb in micro_batches:
                self.seen.append(
                    {f: getattr(mb, f).detach().clone() for f in fields if getattr(mb, f) is not None}
                )
            return out

    module = Recording(**kwargs)
    module.seen, module.on_policy = [], []
    return module


def _noisy_fit(qs: Path, tmp_path: Path, algorithm: Any, *, mini_batch_size: int, noise: float = 0.5,
               return_logprobs: bool = True, max_steps: int = 4, gen_batch_prompts: int = 12,
               ) -> tuple[Any, list[dict[str, float]]]:  # fmt: skip
    """A few steps of the quickstart model (warm-started, so some groups are mixed) with a :class:`NoisyEngine`:
    8 prompts x 4 responses per rollout step, generated ``gen_batch_prompts`` at a time without filtering, so
    the surplus is carried over to the next step (12: every step but the first trains on 4 carried-over groups;
    8: none, every step exactly on-policy when one mini-batch takes it all); returns the module and the metrics
    logged at each step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from transformers import AutoTokenizer

    from dapo_pl.data import PromptDataConfig
    from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig
    from dapo_pl.engines import SamplingConfig
    from dapo_pl.module import OptimConfig

    dm = DAPODataModule(
        train=PromptDataConfig(str(qs / "data" / "train.jsonl")), model_name_or_path=str(qs / "model"),
        prompts_per_step=8, rollout=SamplingConfig(n=4, max_new_tokens=12),
        dynamic_sampling=DynamicSamplingConfig(enabled=False, gen_batch_prompts=gen_batch_prompts),
    )  # fmt: skip
    dm.engine = NoisyEngine(AutoTokenizer.from_pretrained(qs / "model"), noise, return_logprobs)
    module = _recording_module(
        model_name_or_path=str(qs / "model"), algorithm=replace(algorithm, mini_batch_size=mini_batch_size),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0),
    )  # fmt: skip
    logged: list[dict[str, float]] = []

    class Metrics(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Metrics()],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return module, logged


def _unit_ratio(rec: dict[str, torch.Tensor], level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout ratio of each token's unit (token, or the response's product) and where it is defined."""
    fresh = (rec["rollout_mask"] != 0) & (rec["response_mask"] != 0)  # [b, L-1]
    log_ratio = torch.where(fresh, rec["old_logprobs"] - rec["rollout_logprobs"], 0.0).double()  # [b, L-1]
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    return log_ratio.exp(), fresh


CASES = {
    # mini-batch 32 = the whole rollout batch: the exactly on-policy path (no separate old-log-prob pass)
    "tis-token-on-policy": ("tis", "token", 2.0, 0.5, 2.0, 32),
    "both-token": ("both", "token", 1.5, 0.5, 2.0, 16),
    "mis-sequence": ("mis", "sequence", 2.0, 0.2, 5.0, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_real_fit_with_a_mismatched_engine(quickstart_dir: Path, tmp_path: Path, case: tuple) -> None:
    """With engine log-probs off by N(0, 0.5) nats per token: the TIS weight of every corrected token is
    ``min(rho, clip)``, never above ``clip`` (and some do hit it), and MIS drops exactly the tokens (or responses)
    whose ratio is outside ``[low, high]`` and nothing else; the logged fractions count the same tokens."""
    from dapo_pl.module import AlgorithmConfig, RolloutCorrectionConfig

    mode, level, clip, low, high, mini_batch = case
    cfg = RolloutCorrectionConfig(mode=mode, level=level, clip=clip, low=low, high=high)
    module, logged = _noisy_fit(quickstart_dir, tmp_path, AlgorithmConfig(rollout_correction=cfg),
                                mini_batch_size=mini_batch, gen_batch_prompts=8 if mini_batch == 32 else 12)  # fmt: skip
    assert module.seen and logged
    # mini-batch 32 takes the whole batch: the loss pass supplies the old log-probs (and the TIS weights)
    assert module.on_policy == [mini_batch == 32] * len(module.on_policy)
    truncated = masked = units = 0
    for rec in module.seen:
        ratio, fresh = _unit_ratio(rec, level)
        weights = rec["is_weights"].double()
        if mode in ("tis", "both"):
            assert (weights[fresh] <= clip + 1e-12).all()
            torch.testing.assert_close(weights[fresh], ratio[fresh].clamp(max=clip), rtol=1e-6, atol=1e-9)
            truncated += int((ratio[fresh] > clip).sum())
        assert weights[~fresh].eq(1.0).all()  # carried-over rows and padding: weight 1
        outside = fresh & ((ratio < low) | (ratio > high))  # [b, L-1]
        expected = rec["response_mask"] * (~outside if mode in ("mis", "both") else torch.ones_like(outside))
        assert torch.equal(rec["loss_mask"], expected)  # exactly the out-of-range tokens are dropped
        masked += int(outside.sum())
        units += int(fresh.sum())
    assert units > 0
    carried = sum(
        int(((r["response_mask"].sum(1) > 0) & (r["rollout_mask"].sum(1) == 0)).sum()) for r in module.seen
    )
    if mini_batch < 32:  # carried-over responses were in the fit too, with weight 1 and unmasked (above)
        assert carried > 0
    if mode in ("tis", "both"):
        assert truncated > 0  # the bound was really exercised
        assert max(m.get("rollout/is_truncated_frac", 0.0) for m in logged) > 0
    if mode in ("mis", "both"):
        assert 0 < masked < units
        assert max(m.get("rollout/masked_frac", 0.0) for m in logged) > 0
    assert min(m["rollout/ess"] for m in logged if "rollout/ess" in m) < 1


# ---------------------------------------------------------------------------------------------------------
# Partition invariance of the corrected update (a real float64 transformer, tests/dapo_pl/test_update.py's).
# ---------------------------------------------------------------------------------------------------------


def _engine_batch(noise: float = 0.4) -> Any:
    """test_update's batch with engine log-probs: the scoring policy's own plus N(0, noise) per token; response
    5 has none (a carried-over group's)."""
    from dapo_pl.update import cut_batch, score_old

    batch = _batch()
    (mbs,) = cut_batch(
        batch, mini_batch_size=len(batch), max_tokens=10_000, pad_id=0, overlong_filtering=False
    )
    (mb,) = _cast(mbs)
    score_old(_policy(), [mb], batch.temperature)
    assert mb.old_logprobs is not None
    g = torch.Generator().manual_seed(7)
    lps: list[torch.Tensor | None] = []
    for i, (seq, lp) in enumerate(zip(batch.sequences, batch.prompt_lengths, strict=True)):
        trainer = mb.old_logprobs[i, lp - 1 : len(seq) - 1]
        lps.append(trainer + noise * torch.randn(len(trainer), generator=g, dtype=F64))
    lps[5] = None
    return replace(batch, rollout_logprobs=lps)


def _corrected_gradient(batch: Any, algo: Any, ranks: list[list[int]] | None = None) -> torch.Tensor:
    """The gradient of one optimizer step with the correction applied after the old pass, cut with
    ``algo.micro_batch_max_tokens``, over ``ranks`` (row lists; DDP's average of the ranks' gradients)."""
    from dapo_pl.distributed import DataParallel
    from dapo_pl.update import accumulate_gradients, correct_rollouts, cut_batch, score_old

    ranks = ranks or [list(range(len(batch)))]
    cut = []
    for idx in ranks:
        sub = replace(batch, sequences=[batch.sequences[i] for i in idx],
                      prompt_lengths=[batch.prompt_lengths[i] for i in idx], advantages=batch.advantages[idx],
                      truncated=batch.truncated[idx], rollout_logprobs=[batch.rollout_logprobs[i] for i in idx])  # fmt: skip
        (mbs,) = cut_batch(sub, mini_batch_size=len(idx), max_tokens=algo.micro_batch_max_tokens, pad_id=0,
                           overlong_filtering=False)  # fmt: skip
        mbs = _cast(mbs)
        score_old(_policy(), mbs, batch.temperature)
        correct_rollouts(mbs, algo.rollout_correction, DataParallel())  # before the denominator
        cut.append(mbs)
    total = torch.tensor(sum(int((mb.loss_mask != 0).sum()) for mbs in cut for mb in mbs))
    grads = []
    for mbs in cut:
        policy = _policy()
        _perturb(policy)
        num_tokens = token_mean_denominator([mb.loss_mask for mb in mbs], all_reduce=lambda t: total,
                                            grad_average_world_size=len(ranks))  # fmt: skip
        accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=num_tokens,
                             backward=torch.Tensor.backward)  # fmt: skip
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    return sum(grads) / len(ranks)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["tis", "mis", "both"])
def test_corrected_update_is_partition_invariant(mode: str, level: str) -> None:
    """1 micro-batch vs >= 3 micro-batches vs 2 uneven ranks: the same gradient with the correction on, and a
    different one from the uncorrected update (so the correction really acts)."""
    from dapo_pl.module import AlgorithmConfig, RolloutCorrectionConfig

    batch = _engine_batch()
    cfg = RolloutCorrectionConfig(
        mode=mode, level=level, clip=1.5, **({"low": 0.2, "high": 5.0} if level == "sequence" else {})
    )
    whole = _corrected_gradient(batch, AlgorithmConfig(rollout_correction=cfg, micro_batch_max_tokens=10_000))
    split = _corrected_gradient(batch, AlgorithmConfig(rollout_correction=cfg, micro_batch_max_tokens=24))
    ranks = _corrected_gradient(batch, AlgorithmConfig(rollout_correction=cfg, micro_batch_max_tokens=24),
                                ranks=[[0, 1, 2], [3, 4, 5, 6, 7]])  # fmt: skip
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(ranks, whole, rtol=0, atol=1e-10)
    plain = _corrected_gradient(batch, AlgorithmConfig(micro_batch_max_tokens=10_000))
    assert (plain - whole).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# 2 gloo ranks against 1 rank, correction on (tests/dapo_pl/test_distributed.py's set-up).
# ---------------------------------------------------------------------------------------------------------


class ScriptedEngineWithLogprobs(ScriptedEngine):
    """test_distributed's scripted rollouts (a function of the prompt alone, so 1 and 2 ranks see the same
    groups), now also reporting log-probs: the synced policy's own for the scripted tokens, at the sampling
    temperature, plus N(0, 0.4) noise seeded by the prompt and the response index (a mismatched engine)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: Any, seed: int) -> list[list[Any]]:
        from dapo_pl.objective import logprobs_from_logits

        out = super().generate(prompts, params, seed)
        for ids, group in zip(prompts, out, strict=True):
            for j, c in enumerate(group):
                seq = torch.tensor([ids + c.token_ids])
                logits = self.model(input_ids=seq, use_cache=False).logits[0, len(ids) - 1 : -1]  # [Lr, V]
                lp = logprobs_from_logits(logits.double(), torch.tensor(c.token_ids), params.temperature)
                g = torch.Generator().manual_seed(sum(ids) * 31 + j)
                c.logprobs = (lp + 0.4 * torch.randn(len(lp), generator=g, dtype=F64)).tolist()
        return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("mode", "mini_batch"), [("both", 8), ("tis", 16)], ids=["both", "tis-on-policy"])
def test_two_ddp_ranks_reproduce_the_one_rank_corrected_update(
    tiny: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
    mini_batch: int,
) -> None:
    """TIS (+ MIS) at token level on a mismatched engine: 2 DDP ranks give the 1-rank gradient at every optimizer
    step (the MIS-masked tokens have left the all-reduced denominator on both), and the same rollout/* metrics.
    Mini-batch 16 = the whole step: the on-policy path, whose TIS weights come from the loss pass."""
    from dapo_pl.module import RolloutCorrectionConfig

    algo = {"rollout_correction": RolloutCorrectionConfig(mode=mode, level="token", clip=1.5)}
    kw = {"algorithm": algo, "engine": ScriptedEngineWithLogprobs, "mini_batch_size": mini_batch}
    one = _fit(tiny, tmp_path / "one", devices=1, **kw)[0]
    two = _fit(tiny, tmp_path / "two", devices=2, **kw)
    _assert_same_update(one, two)
    for m1, m2 in zip(one["metrics"], two[0]["metrics"], strict=True):
        assert 0 < m1["rollout/is_truncated_frac"] < 1
        assert (0 < m1["rollout/masked_frac"] < 1) if mode == "both" else m1["rollout/masked_frac"] == 0
        for key in ("rollout/is_ratio_mean", "rollout/is_ratio_max", "rollout/is_truncated_frac",
                    "rollout/masked_frac", "rollout/ess"):  # fmt: skip
            assert m2[key] == pytest.approx(m1[key], rel=1e-9), key


@pytest.mark.slow
def test_bypass_takes_the_engine_logprobs_as_the_old_policy(quickstart_dir: Path, tmp_path: Path) -> None:
    """``old_logprobs: engine``: on every token the engine scored, the old log-prob *is* the (noisy) engine's;
    carried-over responses, which have none, were scored by the trainer instead."""
    from dapo_pl.module import AlgorithmConfig

    module, _ = _noisy_fit(
        quickstart_dir, tmp_path, AlgorithmConfig(old_logprobs="engine"), mini_batch_size=16
    )
    fresh_tokens = carried_rows = 0
    for rec in module.seen:
        fresh = (rec["rollout_mask"] != 0) & (rec["response_mask"] != 0)
        assert torch.equal(rec["old_logprobs"][fresh], rec["rollout_logprobs"][fresh])
        fresh_tokens += int(fresh.sum())
        carried = (rec["response_mask"].sum(1) > 0) & (rec["rollout_mask"].sum(1) == 0)  # [b]
        if carried.any():  # the trainer's log-probs: real ones (< 0), not the zeros of a missing engine value
            assert (rec["old_logprobs"][carried][rec["response_mask"][carried] != 0] < 0).all()
            carried_rows += int(carried.sum())
    assert fresh_tokens > 0 and carried_rows > 0


@pytest.mark.slow
def test_bypass_refuses_an_engine_without_logprobs(quickstart_dir: Path, tmp_path: Path) -> None:
    from dapo_pl.module import AlgorithmConfig

    with pytest.raises(ValueError, match=r"old_logprobs='engine' needs log-probs .*NoisyEngine returns none"):
        _noisy_fit(quickstart_dir, tmp_path, AlgorithmConfig(old_logprobs="engine"), mini_batch_size=16,
                   return_logprobs=False)  # fmt: skip

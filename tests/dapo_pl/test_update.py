"""The update path through a real (tiny, float64) transformer: partition invariance and overlong filtering.

The gradient of one optimizer step must not depend on how its mini-batch is cut into micro-batches (token budget)
or spread over ranks: the bug class that hit verl, TRL and ms-swift. Float64 makes the comparison tight (1e-10).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo_pl.batch import MicroBatch, RolloutBatch, collate
from dapo_pl.distributed import DataParallel
from dapo_pl.module import AlgorithmConfig, DAPOModule, OptimConfig, make_optimizer
from dapo_pl.objective import token_mean_denominator
from dapo_pl.update import ScoreStats, accumulate_gradients, cut_batch, is_on_policy, score_old

VOCAB = 24


def _policy() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).double()


def _batch(num: int = 8) -> RolloutBatch:
    g = torch.Generator().manual_seed(1)
    sequences, prompt_lengths = [], []
    for _ in range(num):
        lp = int(torch.randint(1, 5, (1,), generator=g))
        lr = int(torch.randint(1, 9, (1,), generator=g))
        sequences.append(torch.randint(1, VOCAB, (lp + lr,), generator=g))
        prompt_lengths.append(lp)
    return RolloutBatch(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        advantages=torch.randn(num, generator=g),
        truncated=torch.tensor([i % 3 == 0 for i in range(num)]),
        rollout_logprobs=[None] * num,
        temperature=0.9,
    )


def _perturb(model: torch.nn.Module) -> None:
    """Move the policy away from the one that scored old log-probs, so ratios leave [1-eps_low, 1+eps_high]."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _cast(mbs: list[MicroBatch]) -> list[MicroBatch]:
    for mb in mbs:
        mb.loss_mask, mb.response_mask = mb.loss_mask.double(), mb.response_mask.double()
        mb.advantages, mb.rollout_logprobs = mb.advantages.double(), mb.rollout_logprobs.double()
    return mbs


def _gradient(batch: RolloutBatch, algo: AlgorithmConfig, *, shared_denominator: bool = True) -> torch.Tensor:
    """Flat gradient of one optimizer step over the whole batch, cut with ``algo.micro_batch_max_tokens``."""
    (mbs,) = cut_batch(batch, mini_batch_size=len(batch), max_tokens=algo.micro_batch_max_tokens, pad_id=0,
                       overlong_filtering=algo.overlong_filtering)  # fmt: skip
    return _gradient_of(_cast(mbs), batch, algo, shared_denominator=shared_denominator)


def _gradient_of(
    mbs: list[MicroBatch], batch: RolloutBatch, algo: AlgorithmConfig, *, shared_denominator: bool = True
) -> torch.Tensor:
    """Flat gradient of one optimizer step over the micro-batches ``mbs`` (old log-probs from the base policy)."""
    base = _policy()
    score_old(base, mbs, batch.temperature)
    policy = copy.deepcopy(base)
    _perturb(policy)
    if algo.loss_agg != "token-mean":
        num_tokens = None
    elif shared_denominator:
        num_tokens = token_mean_denominator([mb.loss_mask for mb in mbs])
    else:  # the bug: each micro-batch divides by its own token count
        for mb in mbs:
            accumulate_gradients(policy, [mb], temperature=batch.temperature, algo=algo,
                                 num_tokens=token_mean_denominator(mb.loss_mask), backward=torch.Tensor.backward)  # fmt: skip
        return torch.cat([p.grad.flatten() for p in policy.parameters()])
    stats = accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=num_tokens,
                                 backward=torch.Tensor.backward)  # fmt: skip
    assert stats["clipfrac_high"] + stats["clipfrac_low"] > 0  # clipping is exercised
    return torch.cat([p.grad.flatten() for p in policy.parameters()])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("budget", [24, 40])
def test_micro_batch_partition_does_not_change_the_gradient(agg: str, budget: int) -> None:
    batch = _batch()
    whole = _gradient(batch, AlgorithmConfig(loss_agg=agg, micro_batch_max_tokens=10_000))
    (parts,) = cut_batch(batch, mini_batch_size=8, max_tokens=budget, pad_id=0, overlong_filtering=False)
    assert len(parts) >= 3  # really split
    split = _gradient(batch, AlgorithmConfig(loss_agg=agg, micro_batch_max_tokens=budget))
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-10)


def test_per_micro_batch_denominators_would_change_the_gradient() -> None:
    """The negative control: the test above can fail, since per-micro-batch token means differ."""
    batch = _batch()
    whole = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=10_000))
    wrong = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=24), shared_denominator=False)
    assert (wrong - whole).abs().max() > 1e-4


def test_two_ranks_average_to_the_one_rank_gradient() -> None:
    """Two ranks hold half the responses each; the all-reduced count over world size 2, then DDP's average."""
    batch = _batch()
    algo = AlgorithmConfig(micro_batch_max_tokens=10_000)
    whole = _gradient(batch, algo)
    halves = [list(range(0, 3)), list(range(3, 8))]  # uneven token counts on purpose
    counts, cut = [], []
    for idx in halves:
        sub = RolloutBatch([batch.sequences[i] for i in idx], [batch.prompt_lengths[i] for i in idx],
                           batch.advantages[idx], batch.truncated[idx], [None] * len(idx), batch.temperature)  # fmt: skip
        (mbs,) = cut_batch(
            sub, mini_batch_size=len(idx), max_tokens=10_000, pad_id=0, overlong_filtering=False
        )
        cut.append(_cast(mbs))
        counts.append(token_mean_denominator([mb.loss_mask for mb in mbs]))
    total = sum(counts)
    grads = []
    for mbs in cut:
        base = _policy()
        score_old(base, mbs, batch.temperature)
        policy = copy.deepcopy(base)
        _perturb(policy)
        denom = token_mean_denominator(
            [mb.loss_mask for mb in mbs], all_reduce=lambda t: total, grad_average_world_size=2
        )
        accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=denom,
                             backward=torch.Tensor.backward)  # fmt: skip
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    torch.testing.assert_close((grads[0] + grads[1]) / 2, whole, rtol=0, atol=1e-10)


def test_overlong_filtering_equals_dropping_truncated_responses() -> None:
    """Masking truncated responses removes them from the loss and from the denominator: same gradient as a
    batch without them (advantages unchanged)."""
    batch = _batch()
    filtered = _gradient(batch, AlgorithmConfig(overlong_filtering=True, micro_batch_max_tokens=30))
    keep = [i for i in range(len(batch)) if not batch.truncated[i]]
    dropped = RolloutBatch([batch.sequences[i] for i in keep], [batch.prompt_lengths[i] for i in keep],
                           batch.advantages[keep], batch.truncated[keep], [None] * len(keep), batch.temperature)  # fmt: skip
    torch.testing.assert_close(
        filtered, _gradient(dropped, AlgorithmConfig(micro_batch_max_tokens=10_000)), rtol=0, atol=1e-10
    )
    unfiltered = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=30))
    assert (unfiltered - filtered).abs().max() > 1e-4


def test_responses_without_loss_tokens_never_run() -> None:
    """Truncated responses under overlong filtering and empty responses are left out of the micro-batches: fewer
    rows through the model, the same gradient as the full micro-batch with their loss masks zeroed."""
    batch = _batch()
    batch.sequences[1] = batch.sequences[1][: batch.prompt_lengths[1]]  # an empty response
    algo = AlgorithmConfig(overlong_filtering=True, micro_batch_max_tokens=30)
    (mbs,) = cut_batch(batch, mini_batch_size=8, max_tokens=30, pad_id=0, overlong_filtering=True)
    idle = {0, 1, 3, 6}  # truncated (i % 3 == 0) or empty
    assert sum(mb.input_ids.shape[0] for mb in mbs) == len(batch) - len(idle)
    assert all(bool((mb.loss_mask.sum(dim=1) > 0).all()) for mb in mbs)
    weight = torch.tensor([0.0 if i in idle else 1.0 for i in range(len(batch))])
    every_row = collate(batch, list(range(len(batch))), 0, weight)  # the rows all run, masked
    whole = _gradient_of(_cast([every_row]), batch, algo)
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(_gradient_of(_cast(mbs), batch, algo), whole, rtol=0, atol=1e-10)


def test_a_mini_batch_left_without_responses_still_steps() -> None:
    """A mini-batch whose responses are all filtered keeps its optimizer step: one padding micro-batch gives
    every parameter a zero gradient (not None), as the masked full pass did, so AdamW's moments still move."""
    batch = replace(_batch(), truncated=torch.tensor([False] * 4 + [True] * 4))
    first, second = cut_batch(batch, mini_batch_size=4, max_tokens=10_000, pad_id=0, overlong_filtering=True)
    assert sum(mb.input_ids.shape[0] for mb in first) == 4
    assert len(second) == 1 and second[0].input_ids.shape == (1, 2) and float(second[0].loss_mask.sum()) == 0
    policy = _policy()
    mbs = _cast(second)
    score_old(policy, mbs, batch.temperature)
    accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=AlgorithmConfig(),
                         num_tokens=token_mean_denominator([mb.loss_mask for mb in mbs]),
                         backward=torch.Tensor.backward)  # fmt: skip
    assert all(p.grad is not None and not p.grad.any() for p in policy.parameters())


def test_fused_adamw_matches_the_default_and_bumps_the_version_counters() -> None:
    """The default optimizer is fused on CPU: the same parameters as torch's default AdamW (float64, 3 steps, weight
    decay on), and every stepped parameter's version counter moves (the vLLM sync's change signal); a parameter
    without a gradient is neither changed nor bumped."""
    models, optimizers = [_policy(), _policy()], []
    for model, fused in zip(models, (None, False), strict=True):
        params = list(model.parameters())
        optimizers.append(make_optimizer(params, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused)))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    g = torch.Generator().manual_seed(7)
    frozen = "model.norm.weight"
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in models[0].named_parameters()}
        for model in models:
            for n, p in model.named_parameters():
                p.grad = None if n == frozen else grads[n].clone()
        before = {n: (p._version, p.detach().clone()) for n, p in models[0].named_parameters()}
        for opt in optimizers:
            opt.step()
        for n, p in models[0].named_parameters():
            moved = p._version > before[n][0]
            assert moved == (n != frozen) and torch.equal(p.detach(), before[n][1]) == (n == frozen), n
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


def test_score_stats_report_nothing_without_tokens() -> None:
    assert ScoreStats().metrics() == {}


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_head_chunk_size_does_not_change_the_gradient(chunk: int) -> None:
    """The partition of response tokens into head chunks is invisible, like the micro-batch partition."""
    batch = _batch()
    whole = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=10_000, logprob_chunk_tokens=4096))
    torch.testing.assert_close(
        _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=24, logprob_chunk_tokens=chunk)),
        whole, rtol=0, atol=1e-10,
    )  # fmt: skip


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _with_engine_logprobs(batch: RolloutBatch) -> RolloutBatch:
    """Engine log-probs for every response (slightly off the trainer's), so the engine-gap metric is defined."""
    g = torch.Generator().manual_seed(5)
    lps = [
        -torch.rand(len(s) - lp, generator=g)
        for s, lp in zip(batch.sequences, batch.prompt_lengths, strict=True)
    ]
    return replace(batch, rollout_logprobs=lps)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_on_policy_update_skips_the_old_pass_with_the_same_gradient_and_metrics(agg: str) -> None:
    """Separate old pass then loss pass, vs the loss pass alone taking its own detached log-probs as old: the
    same gradient, the same entropy and engine-gap metrics, and half the policy forwards."""
    batch = _with_engine_logprobs(_batch())
    algo = AlgorithmConfig(micro_batch_max_tokens=24, kl_coef=0.0, loss_agg=agg)
    grads, metrics, forwards = [], [], []
    for on_policy in (False, True):
        policy = _policy()
        calls = _count_forwards(policy)
        (mbs,) = cut_batch(batch, mini_batch_size=8, max_tokens=24, pad_id=0, overlong_filtering=False)
        mbs = _cast(mbs)
        stats = ScoreStats() if on_policy else None
        scored = {} if on_policy else score_old(policy, mbs, batch.temperature)
        num_tokens = token_mean_denominator([mb.loss_mask for mb in mbs]) if agg == "token-mean" else None
        accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=num_tokens,
                             backward=torch.Tensor.backward, on_policy_stats=stats)  # fmt: skip
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
        metrics.append(stats.metrics() if stats is not None else scored)
        forwards.append(calls[0])
    assert forwards == [2 * len(mbs), len(mbs)] and len(mbs) >= 3
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)
    assert metrics[0].keys() == metrics[1].keys() == {"train/entropy", "rollout/logprob_abs_diff_mean"}
    for key in metrics[0]:
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-12), key


def test_accumulate_without_old_logprobs_names_the_problem() -> None:
    (mbs,) = cut_batch(_batch(), mini_batch_size=8, max_tokens=10_000, pad_id=0, overlong_filtering=False)
    with pytest.raises(ValueError, match="no old_logprobs: call score_old first"):
        accumulate_gradients(_policy(), _cast(mbs), temperature=1.0, algo=AlgorithmConfig(),
                             num_tokens=None, backward=torch.Tensor.backward)  # fmt: skip


def test_is_on_policy_needs_one_epoch_one_mini_batch_and_nothing_carried_over() -> None:
    assert is_on_policy(1, 1, 0.0)
    assert not is_on_policy(2, 1, 0.0) and not is_on_policy(1, 2, 0.0) and not is_on_policy(1, 1, 0.25)


@pytest.mark.parametrize(
    ("algo", "carried", "skipped"),
    [
        (AlgorithmConfig(mini_batch_size=8, micro_batch_max_tokens=24), 0.0, True),
        (AlgorithmConfig(mini_batch_size=8, micro_batch_max_tokens=24, kl_coef=0.1), 0.0, True),
        (AlgorithmConfig(mini_batch_size=8, micro_batch_max_tokens=24, ppo_epochs=2), 0.0, False),
        (AlgorithmConfig(mini_batch_size=4, micro_batch_max_tokens=24), 0.0, False),
        (AlgorithmConfig(mini_batch_size=8, micro_batch_max_tokens=24), 0.5, False),
    ],
)
def test_module_prepare_skips_the_old_pass_only_when_on_policy(
    algo: AlgorithmConfig, carried: float, skipped: bool
) -> None:
    """The module's wiring: no policy forward before the loss pass when on-policy; the reference pass (KL)
    still runs; any second mini-batch, second epoch or carried-over group brings the old pass back."""
    module = DAPOModule("unused", algorithm=algo)
    module.policy = _policy()
    module.ref_policy = _policy() if algo.kl_coef > 0 else None
    policy_calls = _count_forwards(module.policy)
    ref_calls = _count_forwards(module.ref_policy) if module.ref_policy is not None else [0]
    batch = replace(_batch(), metrics={"train/carried_group_frac": carried})
    metrics: dict[str, float] = {}
    mini_batches, on_policy = module._prepare(batch, metrics, DataParallel())
    num_micro = sum(len(mbs) for mbs in mini_batches)
    assert on_policy == skipped
    assert policy_calls[0] == (0 if skipped else num_micro)
    assert ("train/entropy" in metrics) == (not skipped)
    assert ref_calls[0] == (num_micro if algo.kl_coef > 0 else 0)
    assert all((mb.ref_logprobs is not None) == (algo.kl_coef > 0) for mbs in mini_batches for mb in mbs)


def test_algorithm_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"algorithm.eps_high must be >= 0, got -0.1"):
        AlgorithmConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match=r"algorithm.eps_low must be >= 0"):
        AlgorithmConfig(eps_low=-0.2)
    with pytest.raises(ValueError, match=r"loss_agg"):
        replace(AlgorithmConfig(), loss_agg="sum")
    with pytest.raises(ValueError, match=r"clip_ratio_c"):
        AlgorithmConfig(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match=r"algorithm.logprob_chunk_tokens must be >= 1, got 0"):
        AlgorithmConfig(logprob_chunk_tokens=0)

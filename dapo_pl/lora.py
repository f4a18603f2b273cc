"""LoRA adapters through ``peft``: the policy's frozen base plus trainable low-rank updates ``W + s * B @ A``.

Where each piece lives
- :class:`LoRAConfig` (``model.peft`` in the YAML; None = full fine-tuning) and :func:`apply_lora`, which wraps the
  loaded policy in a ``peft`` ``PeftModel`` inside ``DAPOModule.configure_model``. Only the adapter weights require
  a gradient, so only they reach the optimizer.
- The KL reference (``algorithm.kl_coef > 0``) is the same module with its adapters switched off
  (:class:`AdapterDisabled`), not a second copy of the base.
- Checkpoints hold the trainable weights only (:func:`trainable_state`); :func:`complete_state` puts the frozen
  base back in before a strict load, so a resume checks every adapter key.
- Export (:func:`export_policy`): an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, what
  ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` read) or, with ``export_merged``, a plain model folder.
- The rollout engine's view: :func:`merged_named_tensors` gives the base model's parameter names with the adapter
  folded in (``W + s * B @ A``, computed on the side; the trainer's module is never merged in place), which the
  vLLM engine pushes like full weights. The adapter-only alternative (vLLM's ``enable_lora``) lives in
  :mod:`dapo_pl.engines.lora_sync`.

Departure from the DAPO paper: the paper trains full weights; LoRA is what the peers (verl, TRL, OpenRLHF) offer to
fit a 7B-32B policy on fewer GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the policy (``peft``); the base weights stay frozen.

    Attributes:
        r: adapter rank.
        alpha: scale numerator: the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the adapter's input during training (0: none; the engine never applies it, so
            ``rollout/logprob_abs_diff_mean`` compares like with like only with 0 or in eval).
        target_modules: module names to adapt (peft matches name suffixes), or ``["all-linear"]`` for every
            linear layer except the output head.
        export_merged: at the end of fit, export a plain model with the adapters folded in (``W + s * B @ A``)
            instead of an adapter folder.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    export_merged: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.peft.r (the LoRA rank) must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"model.peft.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.peft.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or any(not m for m in self.target_modules):
            raise ValueError(
                f"model.peft.target_modules must name modules (or 'all-linear'), got {list(self.target_modules)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def is_peft_model(model: Any) -> bool:
    """True for a ``peft`` ``PeftModel`` (without importing peft when it is not loaded)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model under a ``PeftModel`` (its LoRA layers are injected in place, so calling its
    backbone and head runs the adapters); any other model as it is."""
    return model.get_base_model() if is_peft_model(model) else model  # type: ignore[operator, no-any-return]


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` in a ``PeftModel`` with fresh LoRA adapters (``B = 0``: the policy starts as the base).

    Raises ValueError when ``target_modules`` matches nothing, or matches layers other than ``nn.Linear`` (the
    engine sync folds linear adapters only).
    """
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("model.peft needs the peft package: pip install peft") from exc

    targets: str | list[str] = (
        "all-linear" if tuple(cfg.target_modules) == ("all-linear",) else list(cfg.target_modules)
    )
    peft_cfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        wrapped = get_peft_model(model, peft_cfg)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"model.peft.target_modules={list(cfg.target_modules)}: {exc}") from exc
    layers = [(n, m) for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
    other = [n for n, m in layers if not isinstance(m, LoraLinear)]
    if other:
        raise ValueError(
            f"model.peft.target_modules={list(cfg.target_modules)} matches non-linear layers ({', '.join(other[:4])}"
            "): only linear layers can be adapted here"
        )
    if gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; reentrant checkpointing would then
        # drop the adapters' gradients.
        wrapped.enable_input_require_grads()
    return wrapped  # type: ignore[no-any-return]


class AdapterDisabled(nn.Module):
    """The base model under a ``PeftModel``: calls it with its adapters switched off (the KL reference).

    It holds the policy outside its submodules, so it adds no parameters and no checkpoint entries.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = (policy,)  # a tuple: not registered as a submodule

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The policy, with adapters disabled for the duration (for code that calls its parts directly)."""
        with self.policy.disable_adapter():  # type: ignore[operator]
            yield self.policy

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module | None:
        """The policy's LM head (shared): the chunked head of :func:`dapo_pl.update.score_tokens` swaps its
        forward for the duration of one call of this module, as for the policy itself."""
        return self.policy.get_output_embeddings()  # type: ignore[operator, no-any-return]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.active() as model:
            return model(*args, **kwargs)


def trainable_state(state: dict[str, Any], module: nn.Module, prefix: str = "") -> dict[str, Any]:
    """The entries of ``state`` (a ``state_dict`` of ``module`` under ``prefix``) that belong to parameters that
    require a gradient: a LoRA checkpoint keeps the adapters, not the frozen base."""
    keep = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


def complete_state(state: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``state`` (adapters only) plus every entry of ``current`` it lacks (the frozen base, already loaded), so
    a strict ``load_state_dict`` still fails on a missing or unexpected adapter key."""
    return {**{k: v for k, v in current.items() if k not in state}, **state}


def _full(t: Tensor) -> Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # FSDP2 shards (DTensors) are gathered
    return (full_tensor() if callable(full_tensor) else t).detach()


def lora_layers(base: nn.Module) -> dict[str, Any]:
    """The peft LoRA layers of ``base`` by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def lora_delta(layer: Any) -> Tensor | None:
    """``sum_a s_a * B_a @ A_a`` over the layer's active adapters, in float32 or the adapters' dtype if wider
    (None: adapters off or merged).

    Shapes: ``A`` ``[r, in]``, ``B`` ``[out, r]`` -> ``[out, in]`` (transposed for ``fan_in_fan_out`` layers).
    """
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = _full(layer.lora_A[name].weight), _full(layer.lora_B[name].weight)  # [r, in], [out, r]
        wide = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(wide), b.to(wide)
        d = layer.scaling[name] * (b @ a)  # [out, in]
        delta = d if delta is None else delta + d
    if delta is not None and getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta


@torch.no_grad()
def merged_named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The base model's parameters under their checkpoint names, with each LoRA layer's update folded in.

    ``...q_proj.base_layer.weight`` is yielded as ``...q_proj.weight = W + s * B @ A`` (a new tensor: the trainer's
    module stays unmerged), adapter tensors are left out, tied parameters come under every name (as
    :func:`dapo_pl.engines.vllm.named_tensors`). A model that is not a ``PeftModel`` yields its own parameters.
    """
    base = unwrap(model)
    layers = lora_layers(base) if is_peft_model(model) else {}
    for name, param in base.named_parameters(remove_duplicate=False):
        name = name.replace("_orig_mod.", "")
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        tensor = _full(param)
        if owner and leaf == "weight" and owner in layers:
            delta = lora_delta(layers[owner])
            if delta is not None:
                wide = torch.promote_types(tensor.dtype, delta.dtype)
                tensor = (tensor.to(wide) + delta).to(tensor.dtype)  # [out, in]
        yield (f"{owner}.{leaf}" if owner else name), tensor


def export_policy(policy: nn.Module, folder: str, *, merged: bool) -> None:
    """Save a ``PeftModel`` as an adapter folder, or (``merged``) as a plain model with the adapters folded in."""
    if not merged:
        policy.save_pretrained(folder)  # type: ignore[operator]
        return
    base = unwrap(policy)
    state = dict(merged_named_tensors(policy))
    os.makedirs(folder, exist_ok=True)
    # A fresh module of the base's class would double the memory; save_pretrained takes the merged tensors as is.
    base.save_pretrained(folder, state_dict=state)  # type: ignore[operator]

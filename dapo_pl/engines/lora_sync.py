"""How the vLLM engine follows a LoRA policy: merged weights (default) or vLLM's own LoRA (``enable_lora``).

``data.engine.options.lora_sync``:
- ``merged`` (default): the engine holds the plain base architecture; each sync pushes ``W + s * B @ A`` under
  the base names through the usual weight sync (:func:`dapo_pl.lora.merged_named_tensors`). Generation then costs
  what it costs without LoRA.
- ``adapter``: the engine starts with ``enable_lora`` and keeps the base weights it loaded; each sync writes the
  adapter folder (``save_pretrained``, a RAM disk when there is one) and loads it under a new adapter id (a new
  ``LoRARequest`` per version; the previous one is removed), and every generate call names it. Only the adapter
  travels, but every generated token pays for the extra low-rank matmuls.
Measured on the CPU machines: README.md ("LoRA"), ``tools/bench_lora_sync.py``. The known failure of both is silent (the engine
keeps sampling the base model: verl #7495, TRL #5312); ``rollout/logprob_abs_diff_mean`` shows it, and
``tests/dapo_pl/test_lora.py`` fails on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from dapo_pl.lora import is_peft_model, lora_layers, unwrap

LoRASync = Literal["merged", "adapter"]
LORA_SYNCS = ("merged", "adapter")


def adapter_llm_kwargs(lora_sync: str, max_lora_rank: int, *, sleep_level: int | None) -> dict[str, Any]:
    """``vllm.LLM`` keywords of the ``adapter`` mode (LoRA on, one adapter at a time); none for ``merged``.

    ``sleep_level``: the engine's sleep level when sleep mode is on (None: off). Level 2 discards the engine's
    weights, and the adapter mode never sends the base again.
    """
    if lora_sync not in LORA_SYNCS:
        raise ValueError(f"lora_sync must be one of {', '.join(LORA_SYNCS)}, got {lora_sync!r}")
    if lora_sync == "merged":
        return {}
    if sleep_level == 2:
        raise ValueError(
            "lora_sync 'adapter' keeps the base weights the engine loaded, but sleep_level 2 discards them: use "
            "sleep_level 1 or lora_sync 'merged'"
        )
    return {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1, "max_cpu_loras": 1}


def engine_param_meta(model: nn.Module) -> Iterator[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of what the engine receives for ``model``: for a ``PeftModel`` the base's
    parameters under their checkpoint names (no adapter tensors), without computing the merge."""
    base = unwrap(model)
    for name, param in base.named_parameters(remove_duplicate=False):
        name = name.replace("_orig_mod.", "")
        if is_peft_model(model) and ".lora_" in name:
            continue
        yield (
            (name.replace(".base_layer.", ".") if is_peft_model(model) else name),
            param.dtype,
            tuple(param.shape),
        )


def engine_versions(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``engine name -> (storage pointer, in-place version)`` of every trainer tensor the engine's tensor is
    computed from: a merged ``...q_proj.weight`` changes when its ``lora_A`` or ``lora_B`` does, although the
    frozen base tensor never does. For a change-tracking (delta) sync keyed by the names the engine receives."""
    base = unwrap(model)
    layers = lora_layers(base) if is_peft_model(model) else {}
    out: dict[str, tuple[int, ...]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        name = name.replace("_orig_mod.", "")
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        version: tuple[int, ...] = (param.data_ptr(), param._version)
        if owner and leaf == "weight" and owner in layers:
            layer = layers[owner]
            for adapter in layer.active_adapters:
                for part in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                    version += (part.data_ptr(), part._version)
        out[f"{owner}.{leaf}" if owner else name] = version
    return out


class AdapterSync:
    """The ``adapter`` mode: each :meth:`push` loads the policy's current adapter into ``llm`` as a new version."""

    def __init__(self, llm: Any, max_lora_rank: int) -> None:
        self.llm = llm
        self.max_lora_rank = max_lora_rank
        self.version = 0
        self.request: Any = None
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = tempfile.mkdtemp(prefix="dapo-pl-lora-", dir=root)

    def push(self, model: nn.Module) -> None:
        """Write ``model``'s adapter, load it under a new id, drop the previous version."""
        from vllm.lora.request import LoRARequest

        rank = int(model.peft_config["default"].r)  # type: ignore[index, union-attr]
        if rank > self.max_lora_rank:
            raise ValueError(
                f"the policy's LoRA rank {rank} exceeds the engine's max_lora_rank={self.max_lora_rank}; raise "
                "data.engine.options.max_lora_rank (vLLM allows 8, 16, 32, 64, 128, 256, ...)"
            )
        self.version += 1
        folder = os.path.join(self.root, f"v{self.version}")
        model.save_pretrained(folder)  # type: ignore[operator]
        old, self.request = self.request, LoRARequest(f"dapo-pl-policy-v{self.version}", self.version, folder)
        engine = self.llm.llm_engine
        if old is not None:  # one adapter slot: free it before loading the next version
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        if not engine.add_lora(self.request):
            raise RuntimeError(
                f"vLLM refused to load the policy's adapter version {self.version} from {folder}"
            )

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def make_adapter_sync(llm: Any, lora_sync: str, max_lora_rank: int) -> AdapterSync | None:
    """The adapter syncer for ``lora_sync: adapter``; None for ``merged`` (the ordinary weight sync)."""
    return AdapterSync(llm, max_lora_rank) if lora_sync == "adapter" else None


def uses_adapter(sync: AdapterSync | None, model: nn.Module) -> bool:
    """Whether ``model`` goes to the engine as an adapter (adapter mode and a ``PeftModel``)."""
    return sync is not None and is_peft_model(model)

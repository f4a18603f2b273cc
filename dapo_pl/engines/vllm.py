"""The ``vllm`` rollout engine: an offline ``vllm.LLM`` colocated with the trainer, re-synced before every rollout.

Where each piece lives
- Sampling (:meth:`VLLMEngine.generate`): one ``SamplingParams`` per prompt from the same
  :class:`~dapo_pl.engines.base.SamplingConfig` as the transformers engine (n = G, temperature, top_p, top_k,
  max_tokens, stop strings) with a per-prompt seed drawn from the call's seed, so a call is reproducible.
- Log-probs: ``logprobs=0`` with the engine built in ``logprobs_mode="processed_logprobs"``: the log-prob of each
  sampled token under ``softmax(logits / temperature)``, the quantity the trainer computes
  (:func:`dapo_pl.objective.logprobs_from_logits`). vLLM's default (``raw_logprobs``) would be the temperature-1
  distribution. With top_p < 1 or top_k > 0, vLLM reports the log-prob under the truncated, renormalised
  distribution it sampled from, so ``rollout/logprob_abs_diff_mean`` then also measures that truncation (DAPO's
  training rollouts use top_p = 1, top_k off).
- Weight sync (:meth:`VLLMEngine.sync_weights`): the trainer's parameters go into the running engine through vLLM's
  in-place ``reload_weights`` (layer-wise reload, which also redoes the engine's post-load weight processing) or,
  on GPU, vLLM's weight-transfer API over CUDA IPC; then the prefix cache is reset, since cached KV blocks of shared
  prompt prefixes were computed with the old weights. Only what changed since the last push goes (parameters'
  in-place version counters; frozen parameters stay, see :func:`changed_names`). Methods and their measured costs:
  ``docs/rollout-engines.md`` and ``docs/performance.md``.
- Truncation: ``finish_reason == "length"`` (no EOS, no stop string before the cap) marks a response truncated;
  ``token_ids`` include the EOS token when one was generated, like the transformers engine.

Process layout. By default vLLM runs its engine in child processes (spawned: an entry script needs an
``if __name__ == "__main__":`` guard; ``dapo-pl`` has one). On the 2-core CPU machines this was 10x faster at
generation than the in-process engine, which also pins the trainer's process to one torch thread.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dapo_pl.engines.base import Completion, SamplingConfig
from dapo_pl.engines.lora_sync import (
    adapter_llm_kwargs,
    engine_param_meta,
    engine_versions,
    make_adapter_sync,
    uses_adapter,
)
from dapo_pl.engines.watchdog import EngineWatchdog, guarded
from dapo_pl.lora import is_peft_model, merged_named_tensors

SyncMethod = Literal["auto", "rpc", "file", "direct", "ipc"]
SYNC_METHODS = ("auto", "rpc", "file", "direct", "ipc")
_WORKER_EXTENSION = "dapo_pl.engines.vllm.WeightLoaderExtension"


class VLLMEngine:
    """Generates with an offline ``vllm.LLM`` holding a copy of the policy, refreshed by :meth:`sync_weights`.

    Every option below is a key of ``data.engine.options`` in the YAML.

    Args:
        model_name_or_path: the policy checkpoint the engine starts from (the trainer's initial weights).
        tokenizer: the policy's tokenizer (it must define an EOS token).
        dtype: engine dtype (``auto``, ``float32``, ``bfloat16``, ``float16``). Use the trainer's dtype
            (``model.dtype``) so that ``rollout/logprob_abs_diff_mean`` measures sync, not rounding: a mismatch is
            reported once at the first sync.
        max_model_len: longest prompt + response the engine serves (None: the model's context length). A prompt
            that leaves no room for a response raises a ValueError naming its length and this limit.
        gpu_memory_utilization: share of GPU memory vLLM may take for weights, activations and KV cache. The
            trainer lives on the same GPU, so this is well below vLLM's own default (0.92).
        kv_cache_gb: KV-cache size in GiB; overrides ``gpu_memory_utilization`` for the cache. None: on CPU 1 GiB
            (vLLM's CPU default reserves a share of all host memory), on GPU from ``gpu_memory_utilization``.
        enable_sleep_mode: GPU only (ignored with a warning on CPU). After each generate call the engine sleeps
            (``LLM.sleep(sleep_level)``), freeing its KV cache and weights for the trainer's update; it wakes up at
            the next sync or generate call.
        sleep_level: 1 keeps a CPU copy of the weights while asleep; 2 discards them (the next sync or a dynamic
            sampling refill pushes the trainer's weights again). 2 frees the most memory and wastes no copy.
        tensor_parallel_size: GPUs the engine shards the model over.
        enforce_eager: no CUDA graphs / torch.compile. None: True on CPU (compiling costs start-up time and did not
            speed up generation on the 2-core machines), vLLM's default (False) on GPU.
        in_process: run vLLM's engine in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); allows the
            zero-copy ``direct`` sync. Off by default: on CPU it generated 10x slower and limits the trainer's
            process to one torch thread.
        sync_method: how :meth:`sync_weights` pushes weights: ``rpc`` (tensor bytes through
            ``collective_rpc`` to a worker extension, then ``reload_weights``), ``file`` (safetensors in a RAM disk,
            then ``reload_weights(weights_path=...)``: a checkpoint round trip), ``direct`` (``in_process`` only:
            the trainer's tensors handed to ``reload_weights`` by reference), ``ipc`` (CUDA only: vLLM's
            weight-transfer API over CUDA IPC handles, no copy through the host). ``auto``: ``direct`` in process,
            ``ipc`` on GPU, else ``rpc``.
        sync_weights: False makes :meth:`sync_weights` a no-op. A debugging switch: the engine then keeps the
            initial weights and ``rollout/logprob_abs_diff_mean`` grows as the trainer moves away from them.
        return_logprobs: return the engine's log-probs of the sampled tokens (for ``rollout/logprob_abs_diff_mean``).
        max_num_seqs: most sequences vLLM decodes at once (None: vLLM's default).
        seed: the engine's own seed (requests carry their own seeds; this covers anything unseeded).
        lora_sync: how a LoRA policy (``model.peft``) reaches the engine: ``merged`` (``W + s * B @ A`` pushed
            under the base names by the weight sync above) or ``adapter`` (vLLM's ``enable_lora``: the adapter
            loaded under a new id after every update). See :mod:`dapo_pl.engines.lora_sync`.
        max_lora_rank: the largest adapter rank the ``adapter`` mode accepts (vLLM: 8, 16, 32, 64, ...).
        llm_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` keyword (e.g. ``enable_prefix_caching``,
            ``max_num_batched_tokens``); they override the values above.
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_gb: float | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 2,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        in_process: bool = False,
        sync_method: SyncMethod = "auto",
        sync_weights: bool = True,
        return_logprobs: bool = True,
        max_num_seqs: int | None = None,
        seed: int = 0,
        lora_sync: str = "merged",
        max_lora_rank: int = 16,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from vllm.platforms import current_platform

        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token: responses could never end; set one in the tokenizer"
            )
        if sync_method not in SYNC_METHODS:
            raise ValueError(f"sync_method must be one of {', '.join(SYNC_METHODS)}, got {sync_method!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        on_cuda = bool(current_platform.is_cuda_alike())
        if enable_sleep_mode and not on_cuda:
            warnings.warn(
                "vLLM sleep mode needs a GPU: enable_sleep_mode is ignored on this platform", stacklevel=2
            )
            enable_sleep_mode = False
        if enable_sleep_mode and sleep_level == 2 and not sync_weights:
            raise ValueError(
                "sleep_level 2 discards the engine's weights and sync_weights: false never restores them"
            )
        self.sync_method = _resolve_sync_method(sync_method, in_process=in_process, on_cuda=on_cuda)
        self.sync_enabled = sync_weights
        self.return_logprobs = return_logprobs
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self.tokenizer = tokenizer
        kwargs: dict[str, Any] = {
            "model": model_name_or_path,
            "tokenizer": model_name_or_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": (not on_cuda) if enforce_eager is None else enforce_eager,
            "enable_sleep_mode": enable_sleep_mode,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": _WORKER_EXTENSION,
        }
        if kv_cache_gb is None and not on_cuda and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gb = 1.0
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if self.sync_method == "ipc":
            kwargs["weight_transfer_config"] = {"backend": "ipc"}
        kwargs.update(
            adapter_llm_kwargs(
                lora_sync, max_lora_rank, sleep_level=sleep_level if enable_sleep_mode else None
            )
        )
        kwargs.update(llm_kwargs or {})
        t0 = time.perf_counter()
        self.llm = _start_llm(kwargs, in_process=in_process, ipc=self.sync_method == "ipc")
        self.startup_s = time.perf_counter() - t0
        self.watchdog = EngineWatchdog(self.llm)  # a dead engine process: a clear error, never a hang
        self._adapters = make_adapter_sync(self.llm, lora_sync, max_lora_rank)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.dtype: torch.dtype = self.llm.model_config.dtype
        self.last_sync_s = 0.0
        self.num_syncs = 0
        self.last_sync_tensors = 0  # tensors sent by the last push
        self._model: nn.Module | None = None
        self._pushed: dict[str, tuple[int, ...]] | None = None  # tensor_versions at the last push
        self._pushed_id = 0  # id() of the module pushed last
        self._ipc_sender: Any = None
        self._ipc_module: nn.Module | None = None
        self._sleeping: set[str] = set()  # vLLM memory tags asleep: "weights", "kv_cache"
        self._weights_lost = False  # slept at level 2: the engine's weights are garbage until the next push
        self._warned: set[str] = set()

    # ---- weight sync --------------------------------------------------------------------------------------
    @guarded
    def sync_weights(self, model: nn.Module) -> None:
        """Push what changed in ``model`` since the last push into the engine and reset its prefix cache.

        Change is seen through each parameter's storage and in-place version counter (``tensor._version``, bumped
        by optimizer steps and ``load_state_dict``; not by writes through ``param.data``). Nothing changed (e.g. a
        validation right after a rollout): no push. Some parameters frozen: only the engine layers holding a
        changed parameter are pushed (:func:`changed_names`). A new module, FSDP shards, the ``ipc`` method or an
        engine that slept at level 2: everything is pushed.
        """
        self._model = model
        if not self.sync_enabled:
            return
        versions = tensor_versions(model)
        names: set[str] | None = None  # None: push every tensor
        if not self._weights_lost and self._pushed_id == id(model) and self.sync_method != "ipc":
            names = changed_names(self._pushed, versions)
            if names is not None and not names:
                return
        self._check_dtype(model)
        t0 = time.perf_counter()
        self._wake(["weights"])  # asleep, the weights have no device memory to be written into
        self.last_sync_tensors = self._push(model, names)
        self._pushed, self._pushed_id = versions, id(model)
        self.last_sync_s = time.perf_counter() - t0
        self.num_syncs += 1

    def _push(self, model: nn.Module, names: set[str] | None = None) -> int:
        """Push ``names`` (None: all) of ``model``'s tensors; returns how many tensors went."""
        named = [(n, t) for n, t in named_tensors(model) if names is None or n in names]
        partial = names is not None
        with torch.no_grad():
            if uses_adapter(self._adapters, model):  # vLLM's LoRA: the base stays, the adapter is reloaded
                self._adapters.push(model)  # type: ignore[union-attr]
            elif self.sync_method == "ipc":
                self._push_ipc(model)
            elif self.sync_method == "direct":
                self.llm.collective_rpc("dapo_pl_reload", kwargs={"weights": named, "partial": partial})
            elif self.sync_method == "file":
                _push_file(self.llm, named, partial)
            else:
                self.llm.collective_rpc("dapo_pl_load_weights", args=(_bytes_payload(named), partial))
        self._weights_lost = False
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to reset its prefix cache after a weight sync (requests still running?)"
            )
        return len(named)

    def _push_ipc(self, model: nn.Module) -> None:
        if self._ipc_sender is None or self._ipc_module is not model:
            self._ipc_sender = _ipc_sender(self.llm, model)
            self._ipc_module = model
        self._ipc_sender.send_weights()

    def _check_dtype(self, model: nn.Module) -> None:
        param = next(model.parameters(), None)
        if param is not None and param.dtype != self.dtype and "dtype" not in self._warned:
            self._warned.add("dtype")
            warnings.warn(
                f"the trainer's parameters are {param.dtype} but the vLLM engine runs in {self.dtype}: "
                "rollout/logprob_abs_diff_mean then includes rounding; set data.engine.options.dtype to match",
                stacklevel=3,
            )

    # ---- generation ---------------------------------------------------------------------------------------
    @guarded
    def generate(self, prompts: list[list[int]], params: SamplingConfig, seed: int) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order; the same ``seed`` gives the same samples."""
        if not prompts:
            return []
        self._check_lengths(prompts, params)
        self._wake_up()
        rng = random.Random(seed)
        # Children of a request get seeds seed..seed+n-1 inside vLLM, hence the margin.
        sampling = [self._sampling_params(params, rng.randrange(2**31 - params.n)) for _ in prompts]
        requests: list[Any] = [{"prompt_token_ids": list(p)} for p in prompts]
        lora = {"lora_request": self._adapters.request} if self._adapters is not None else {}
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, **lora)
        result = [
            [self._completion(c, params) for c in sorted(out.outputs, key=lambda c: c.index)]
            for out in outputs
        ]
        if self.enable_sleep_mode:  # free KV cache and weights for the trainer's update
            self.llm.sleep(level=self.sleep_level)
            self._sleeping = {"weights", "kv_cache"}
            self._weights_lost = self.sleep_level == 2
        for i, group in enumerate(result):
            if len(group) != params.n:
                raise RuntimeError(
                    f"vLLM returned {len(group)} completions for prompt {i}, expected {params.n}"
                )
        return result

    def _sampling_params(self, params: SamplingConfig, seed: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            seed=seed,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,  # text = decode(token_ids), as in the transformers engine
            # vLLM detokenizes every request incrementally at every step, in its front-end process: 28% of a
            # generate call on the tiny benchmark model (0.57 -> 0.41 s). Stop strings need it; else the text is
            # decoded once per response in `_completion`.
            detokenize=bool(params.stop),
            logprobs=0 if self.return_logprobs else None,  # 0: only the sampled token's
            flat_logprobs=True,
        )

    def _completion(self, out: Any, params: SamplingConfig) -> Completion:
        ids = list(out.token_ids)
        logprobs = _sampled_logprobs(out.logprobs, ids) if self.return_logprobs else None
        text = out.text if params.stop else self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(
            token_ids=ids, text=text, truncated=out.finish_reason == "length", logprobs=logprobs
        )

    def _check_lengths(self, prompts: list[list[int]], params: SamplingConfig) -> None:
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} of this batch has {len(prompt)} tokens, but the vLLM engine's max_model_len is "
                    f"{self.max_model_len}: no room for a response. Raise data.engine.options.max_model_len (up to "
                    "the model's context length) or remove prompts that long from the data."
                )
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_model_len and "length" not in self._warned:
            self._warned.add("length")
            warnings.warn(
                f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds max_model_len="
                f"{self.max_model_len}: such responses stop at max_model_len and count as truncated",
                stacklevel=3,
            )

    def _wake_up(self) -> None:
        """Before generating: weights back (pushed again after a level-2 sleep, e.g. for a refill), then KV cache."""
        self._wake(["weights"])
        if self._weights_lost:
            if self._model is None:
                raise RuntimeError(
                    "VLLMEngine.generate after a level-2 sleep needs sync_weights(model) first"
                )
            self._push(self._model)
        self._wake(["kv_cache"])

    def _wake(self, tags: list[str]) -> None:
        asleep = [t for t in tags if t in self._sleeping]
        if asleep:
            self.llm.wake_up(tags=asleep)
            self._sleeping.difference_update(asleep)

    def close(self) -> None:
        """Shut the engine's processes down and free its memory."""
        llm, self.llm = self.__dict__.get("llm"), None
        if self.__dict__.get("watchdog") is not None:
            self.watchdog.stop()
        self._model = self._ipc_module = self._ipc_sender = None
        if self._adapters is not None:
            self._adapters.close()
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


class WeightLoaderExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``): receives the weights :meth:`VLLMEngine.sync_weights`
    sends and loads them through the worker's in-place ``reload_weights``."""

    def dapo_pl_load_weights(
        self, payload: list[tuple[str, str, list[int], Any]], partial: bool = False
    ) -> int:
        """Load ``(name, dtype, shape, raw bytes)`` entries (the ``rpc`` sync method)."""
        weights = []
        for name, dtype_name, shape, data in payload:
            dtype = getattr(torch, dtype_name)
            if len(data) == 0:
                weights.append((name, torch.empty(shape, dtype=dtype)))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a read-only buffer: only read from here
                flat = torch.frombuffer(data, dtype=torch.uint8)
            weights.append((name, flat.view(dtype).reshape(shape)))
        return self.dapo_pl_reload(weights=weights, partial=partial)

    def dapo_pl_reload(
        self, weights: list[tuple[str, Tensor]] | None = None, path: str | None = None, partial: bool = False
    ) -> int:
        """``reload_weights`` from tensors or a checkpoint folder. ``partial``: only some layers are sent, on
        purpose, so vLLM's warnings about layers that kept their weights are silenced for this call."""
        kwargs: dict[str, Any] = {"weights_iterator": weights} if path is None else {"weights_path": path}
        with _quiet_partial_reload(partial):
            self.reload_weights(**kwargs)  # type: ignore[attr-defined]
        return len(weights or [])


# ---- helpers ------------------------------------------------------------------------------------------------
def named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's parameters under their checkpoint names, each tied parameter under every name it has.

    vLLM 0.32's layer-wise reload keeps a tied ``lm_head`` at its old values unless ``lm_head.weight`` is sent
    too (it logs "ParallelLMHead: Failed to load weights"). FSDP shards (DTensors) are gathered. A LoRA policy
    (``PeftModel``) is sent as its base names with the adapters folded in (:func:`dapo_pl.lora.merged_named_tensors`).
    """
    if is_peft_model(model):
        yield from merged_named_tensors(model)
        return
    for name, param in model.named_parameters(remove_duplicate=False):
        tensor = param.detach()
        full_tensor = getattr(tensor, "full_tensor", None)
        if callable(full_tensor):
            tensor = full_tensor()
        yield name.replace("_orig_mod.", ""), tensor


def tensor_versions(model: nn.Module) -> dict[str, tuple[int, ...]] | None:
    """``name -> (storage pointer, in-place version counter)`` of every tensor :func:`named_tensors` sends; None
    for sharded (DTensor) parameters, whose local shards are not seen from here (always pushed whole)."""
    if is_peft_model(model):  # the engine gets merged base names, which change when their adapters do
        return engine_versions(model)
    versions: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if callable(getattr(param, "full_tensor", None)):
            return None
        versions[name.replace("_orig_mod.", "")] = (param.data_ptr(), param._version)
    return versions


def sync_unit(name: str) -> str:
    """The group a checkpoint tensor is pushed with: its module's parent (``model.layers.0.self_attn`` for
    ``model.layers.0.self_attn.q_proj.weight``). vLLM fuses sibling modules (q/k/v into ``qkv_proj``,
    gate/up into ``gate_up_proj``), and a fused layer reloaded from some of its parts would lose the others."""
    return ".".join(name.split(".")[:-2])


def changed_names(
    before: dict[str, tuple[int, ...]] | None, now: dict[str, tuple[int, ...]] | None
) -> set[str] | None:
    """The tensor names to push: every name in a :func:`sync_unit` with a changed tensor. None: push everything
    (no record of the last push, a different set of tensors, or versions unknown); empty: nothing changed."""
    if before is None or now is None or before.keys() != now.keys():
        return None
    units = {sync_unit(n) for n, v in now.items() if before[n] != v}
    names = {n for n in now if sync_unit(n) in units}
    return None if len(names) == len(now) else names


@contextlib.contextmanager
def _quiet_partial_reload(partial: bool) -> Iterator[None]:
    """Silence vLLM's "Failed to load weights" / "weights were not loaded" warnings of an intended partial push."""
    import logging

    names = (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    )
    loggers = [logging.getLogger(n) for n in names] if partial else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """Per-token log-probs of the sampled tokens from vLLM's (flat or per-position) ``logprobs``."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs although they were requested")
    flat_ids, flat_lps = getattr(logprobs, "token_ids", None), getattr(logprobs, "logprobs", None)
    if flat_ids is not None and flat_lps is not None and list(flat_ids) == token_ids:
        return [float(x) for x in flat_lps]  # logprobs=0: exactly the sampled token at every position
    return [float(position[token].logprob) for position, token in zip(logprobs, token_ids, strict=True)]


def _bytes_payload(named: Iterable[tuple[str, Tensor]]) -> list[tuple[str, str, list[int], Any]]:
    """``(name, dtype, shape, bytes)`` per tensor: msgpack carries raw bytes, not tensors, between processes."""
    payload = []
    for name, tensor in named:
        flat = tensor.to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().data if flat.numel() else b""  # a view, no copy
        payload.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), data))
    return payload


def _push_file(llm: Any, named: Iterable[tuple[str, Tensor]], partial: bool = False) -> None:
    """Write a safetensors checkpoint to a RAM disk when there is one and let the workers reload it."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in named:
        tensor = tensor.to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage: tied weights are written twice
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="dapo-pl-weights-", dir=root)
    try:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        llm.collective_rpc("dapo_pl_reload", kwargs={"path": folder, "partial": partial})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _LLMSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over an offline ``LLM`` (whose methods take request dicts)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def _ipc_sender(llm: Any, model: nn.Module) -> Any:
    """vLLM's trainer-side CUDA IPC engine over ``model``'s parameters (every tied name included).

    Every trainer rank passes ``rank=0``: each rank owns its own colocated engine and is its own sender (the
    handle all-gather then lets each engine pick the handles of its own GPU).
    """
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    class PolicySource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, dtype, shape) for name, dtype, shape in engine_param_meta(model)]

        def __iter__(self) -> Iterator[tuple[str, Tensor]]:
            return named_tensors(model)

    init_info = IPCTrainerInitInfo(rank=0, packed=False)
    return WeightTransferTrainerFactory.trainer_init(
        init_info, client=_LLMSyncClient(llm), source=PolicySource()
    )


def _resolve_sync_method(method: str, *, in_process: bool, on_cuda: bool) -> str:
    if method == "auto":
        return "direct" if in_process else ("ipc" if on_cuda else "rpc")
    if method == "direct" and not in_process:
        raise ValueError("sync_method 'direct' hands tensors over by reference and needs in_process: true")
    if method == "ipc" and not on_cuda:
        raise ValueError("sync_method 'ipc' uses CUDA IPC handles and needs a GPU; use rpc or file on CPU")
    return method


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_llm(kwargs: dict[str, Any], *, in_process: bool, ipc: bool) -> Any:
    from vllm import LLM

    if ipc:
        # CUDA IPC handles are tuples of torch objects that msgpack cannot carry; vLLM's own IPC example sets this.
        # The messages stay on this host (the trainer and its engine processes).
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}
    if not ipc and "OMP_WAIT_POLICY" not in os.environ:
        # The engine's processes inherit this at spawn. Colocated on few cores, OpenMP threads that spin after each
        # parallel region take cores from the trainer; vLLM's own CPU binding (VLLM_CPU_OMP_THREADS_BIND=auto:
        # compute threads on all but one core, one core left to its scheduler) is kept: binding every core to
        # compute made generation ~10x slower on 2 cores (docs/performance.md).
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    with _environ(env):
        return LLM(**kwargs)

"""The ``transformers`` rollout engine: our own sampling loop over a KV cache, on the trainer's own module.

It shares the trainer's module, so weight sync is free and exact: rollouts of step k always use the weights after
step k-1's updates. Sampling is seeded per call under ``torch.random.fork_rng`` so the training RNG stream is
untouched.

The loop (:func:`sample`) replaces ``model.generate``, whose per-token overhead (a list of logits processors and
stopping criteria, re-built inputs) dominates on small models and whose ``output_logits`` keep ``[P*n, T, V]``
float logits for the log-probs. Here each prompt is prefilled once (its cache then copied to its ``n`` samples),
each step keeps only the sampled token and its log-prob (``[P*n]``), finished rows leave the batch (their cache
rows are dropped), and the loop stops when every row is done. Memory for the logits: one ``[P*n, V]`` step. The KV
cache of full-attention layers lives in preallocated buffers that grow by doubling (:class:`PreallocatedLayer`),
not in transformers' per-token ``torch.cat`` of the whole cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from dapo_pl.engines.base import Completion, SamplingConfig
from dapo_pl.engines.decode import DecodeStep, lean_decoder

FIRST_CAPACITY = 256  # response positions the KV-cache buffers hold before their first doubling


class TransformersEngine:
    """Generates with :func:`sample` (a KV-cache sampling loop) on the module given to :meth:`sync_weights`.

    Args:
        tokenizer: the policy's tokenizer (pad and EOS tokens are taken from it).
        max_batch_sequences: at most this many sequences (prompts x n) per ``generate`` call.
        return_logprobs: also return the engine's per-token log-probs (for ``rollout/logprob_abs_diff_mean``);
            they cost nothing extra (one gather and log-sum-exp per step).
        lean_decode: decode Qwen2/Llama models on CPU with :mod:`dapo_pl.engines.decode`'s lean step (the same
            arithmetic as the model's forward, less per-call overhead); False: always the model's own forward.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_batch_sequences: int = 256,
        return_logprobs: bool = True,
        lean_decode: bool = True,
    ) -> None:
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.return_logprobs = return_logprobs
        self.lean_decode = lean_decode
        self.model: nn.Module | None = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(tokenizer)

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # the same module object: nothing to copy

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingConfig, seed: int) -> list[list[Completion]]:
        if self.model is None:
            raise RuntimeError("TransformersEngine.generate called before sync_weights(model)")
        per_call = max(1, self.max_batch_sequences // params.n)
        out: list[list[Completion]] = []
        was_training = self.model.training
        self.model.train(False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), per_call):
                    out.extend(self._generate_chunk(prompts[start : start + per_call], params))
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingConfig) -> list[list[Completion]]:
        assert self.model is not None
        device = next(self.model.parameters()).device
        input_ids, attention_mask = _left_pad(prompts, self.pad_id, device)  # [P, Lp]
        stop = _stop_checker(self.tokenizer, params.stop) if params.stop else None
        new_tokens, logprobs = sample(
            self.model, input_ids, attention_mask, params, eos_ids=self.eos_ids, pad_id=self.pad_id, stop=stop,
            synced=_synced(self.model), lean=self.lean_decode,
        )  # fmt: skip
        completions = [
            self._completion(new_tokens[i], logprobs if self.return_logprobs else None, i, params)
            for i in range(new_tokens.shape[0])
        ]
        return [completions[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]

    def _completion(
        self, tokens: Tensor, logprobs: Tensor | None, i: int, params: SamplingConfig
    ) -> Completion:
        ids = tokens.tolist()
        end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
        if params.stop:  # a stop string before any EOS ends the response there (pads follow it)
            stop_end = self._stop_string_end(ids if end is None else ids[:end], params.stop)
            end = stop_end if stop_end is not None else end
        # Without EOS or a stop string a sequence runs to max_new_tokens, so it is truncated.
        truncated = end is None
        if end is not None:
            ids = ids[: end + 1]
        lp = logprobs[i, : len(ids)].tolist() if logprobs is not None else None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, text=text, truncated=truncated, logprobs=lp)

    def _stop_string_end(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Index of the token that completes the first stop string in ``ids`` (None: no stop string).

        Bisection over prefixes: once a prefix's text contains a stop string, every longer prefix does.
        """

        def has_stop(n: int) -> bool:
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            return any(s in text for s in stop)

        if not ids or not has_stop(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if has_stop(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo - 1


def filtered_probs(logp: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sampling probabilities from log-probs ``logp`` (log-softmax of the tempered logits), restricted to the
    ``top_k`` most likely tokens, then to the nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (a token is dropped when
    the tokens more likely than it already hold ``top_p``), as in ``transformers``' warpers. Rows sum to 1.

    Shapes: ``logp`` ``[B, V]`` -> ``[B, V]``.
    """
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logp = logp.masked_fill(logp < kth, float("-inf"))  # [B, V]
    probs = logp.exp()  # [B, V]
    if top_k or top_p < 1.0:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        before = sorted_p.cumsum(dim=-1) - sorted_p  # [B, V]: mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)  # [B, V]
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: Tensor) -> Tensor:
    """One token per row, with probability ``probs`` (rows sum to 1 or any positive total).

    Inverse-CDF sampling: one uniform number per row and a binary search in the row's cumulative sum. It draws
    from the same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws one exponential variate per
    vocabulary entry (measured here: 4 ms for 128 x 259, 1.2 s for 64 x 152k; this: 0.3 ms). A token of
    probability 0 is never drawn: the search takes the first entry whose cumulative sum exceeds the draw, and a
    rounding overshoot past the last positive entry falls back to the row's most likely token.

    Shapes: ``probs`` ``[B, V]`` -> ``[B]`` token ids.
    """
    cdf = probs.cumsum(dim=-1)  # [B, V]
    target = torch.rand((probs.shape[0], 1), dtype=cdf.dtype, device=probs.device) * cdf[:, -1:]  # [B, 1]
    picked = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)  # [B, 1]
    zero = probs.gather(-1, picked) <= 0  # [B, 1]
    return torch.where(zero, probs.argmax(dim=-1, keepdim=True), picked)[:, 0]


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    params: SamplingConfig,
    *,
    eos_ids: list[int],
    pad_id: int,
    stop: Callable[[Tensor], bool] | None = None,
    synced: bool = False,
    lean: bool = True,
) -> tuple[Tensor, Tensor]:
    """``params.n`` sampled continuations of each left-padded prompt, and the log-prob of every sampled token.

    Each step: log-softmax of the tempered logits, top-k/top-p filter (:func:`filtered_probs`), one draw per row
    (:func:`draw`).

    The log-probs are those of the tempered distribution before top-k/top-p (``z[y] - logsumexp(z)``,
    ``z = logits / temperature``), exactly what the trainer computes for the same tokens. A row ends at an EOS
    token or when ``stop`` (given the row's tokens so far) finds a stop string; ended rows are fed padding and
    leave the batch (with their cache rows) once they are an eighth of it.
    ``synced`` (sharded models, every forward a collective): ended rows stay in the batch, fed padding, and the
    loop runs until every rank is done. ``lean``: decode with :func:`~dapo_pl.engines.decode.lean_decoder`'s step
    where the model qualifies (the same arithmetic, less overhead); the prompts always go through the model's
    own forward.

    Shapes: ``input_ids``/``attention_mask`` ``[P, Lp]``; returns tokens ``[P*n, T]`` (``pad_id`` after a row
    ends; ``T <= max_new_tokens``, the longest row) and log-probs ``[P*n, T]`` (float32 at least; 0 after a row ends);
    row ``p*n + j`` is sample j of prompt p.
    """
    n, steps, device = params.n, params.max_new_tokens, input_ids.device
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [P, Lp]
    last_only = (
        {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    )  # only the last position's logits
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **last_only,
    )
    # Each prompt is encoded once; its n samples get a copy of its cache, in buffers that grow by doubling.
    cache = preallocate(out.past_key_values, n, input_ids.shape[1] + min(steps, FIRST_CAPACITY))
    decode = lean_decoder(model) if lean and not synced and hasattr(cache, "layers") else None
    rows = _Rows(
        logits=out.logits[:, -1].repeat_interleave(n, dim=0),  # [B, V]
        mask=attention_mask.repeat_interleave(n, dim=0),  # [B, Lp]
        position=positions[:, -1:].repeat_interleave(n, dim=0),  # [B, 1]
        index=torch.arange(input_ids.shape[0] * n, device=device),  # [B]
    )
    batch = rows.index.shape[0]
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)  # [B, T]
    dtype = torch.promote_types(out.logits.dtype, torch.float32)  # float32 at least, as the trainer's
    logprobs = torch.zeros((batch, steps), dtype=dtype, device=device)  # [B, T]
    eos = torch.tensor(eos_ids, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # [B], indexed by original row
    for t in range(steps):
        # [A, V] over the A rows still in the batch
        logp = torch.log_softmax(rows.logits.to(dtype) / params.temperature, dim=-1)
        live = alive[rows.index]  # [A]
        nxt = torch.where(live, draw(filtered_probs(logp, params.top_k, params.top_p)), pad_id)  # [A]
        tokens[rows.index, t] = nxt
        logprobs[rows.index, t] = torch.where(live, logp.gather(-1, nxt.unsqueeze(-1))[:, 0], 0.0)
        alive[rows.index] = live & ~torch.isin(nxt, eos) & ~_stopped(stop, tokens, rows.index, t)
        if t == steps - 1 or _all_done(not bool(alive.any()), synced, device):
            return tokens[:, : t + 1], logprobs[:, : t + 1]
        keep = alive[rows.index]  # [A]
        ended = keep.shape[0] - int(keep.sum())
        if not synced and ended and ended >= keep.shape[0] // 8:  # copying the cache pays off in batches
            rows, nxt = rows.select(keep, cache), nxt[keep]
        rows.logits = _step(model, rows, nxt, cache, decode)
    return tokens, logprobs


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV-cache layer whose keys and values live in preallocated buffers.

    transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, copying the whole cache of every layer
    at every step: quadratic in the response length (17% of a sampling step of the ~9.5M benchmark model on CPU at
    32 tokens). Here each step writes one position and ``keys``/``values`` are views of the filled part; a write
    past the capacity doubles the buffers (amortised linear), so memory follows the longest live row, not
    ``max_new_tokens`` up front.

    Shapes: buffers ``[B, H_kv, capacity, D]``; ``keys``/``values`` ``[B, H_kv, length, D]``.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = keys.shape[-2]
        shape = (*keys.shape[:2], max(capacity, self.length), keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._keys[:, :, : self.length], self._values[:, :, : self.length] = keys, values
        self._view()

    def _view(self) -> tuple[Tensor, Tensor]:
        keys, values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys = torch.cat([self._keys, torch.empty_like(self._keys)], dim=-2)
            self._values = torch.cat([self._values, torch.empty_like(self._values)], dim=-2)
        self._keys[:, :, self.length : end], self._values[:, :, self.length : end] = key_states, value_states
        self.length = end
        return self._view()

    def batch_select_indices(self, indices: Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._view()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for sampling only")


def preallocate(cache: Any, repeats: int, capacity: int) -> Any:
    """``cache`` (a prefill's ``DynamicCache``) with each batch row repeated ``repeats`` times, its full-attention
    layers moved into :class:`PreallocatedLayer` buffers of ``capacity`` positions (other layer kinds, e.g.
    sliding-window ones, are only repeated)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # not a layered cache: leave it to transformers
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        return cache
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) is DynamicLayer and keys is not None and values is not None:
            repeated = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
            layers[i] = PreallocatedLayer(*repeated, capacity)
        elif repeats > 1:
            layer.batch_repeat_interleave(repeats)
    return cache


@dataclass
class _Rows:
    """The rows still being sampled: next-token logits ``[A, V]``, attention mask ``[A, Lp + t]``, last
    position ``[A, 1]``, and their index ``[A]`` among the ``P*n`` rows."""

    logits: Tensor
    mask: Tensor
    position: Tensor
    index: Tensor

    def select(self, keep: Tensor, cache: Any) -> _Rows:
        """Only the rows where ``keep`` (``[A]`` bool) is set; the KV cache drops the others too."""
        cache.batch_select_indices(keep.nonzero()[:, 0])
        return _Rows(self.logits[keep], self.mask[keep], self.position[keep], self.index[keep])


def _step(model: nn.Module, rows: _Rows, last: Tensor, cache: Any, lean: DecodeStep | None) -> Tensor:
    """Feed each row's last token ``[A]``; return the next logits ``[A, V]`` (the cache grows by one). ``lean``:
    the model's lean decoding step (:mod:`dapo_pl.engines.decode`), else the model's own forward."""
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones((rows.mask.shape[0], 1))], dim=1)  # [A, Lp + t + 1]
    rows.position = rows.position + 1  # [A, 1]
    if lean is not None:
        return lean(last, rows.mask, rows.position, cache)
    out = model(input_ids=last.unsqueeze(-1), attention_mask=rows.mask, position_ids=rows.position,
                past_key_values=cache, use_cache=True)  # fmt: skip
    return out.logits[:, -1]


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward accepts ``name`` (older or custom models may lack ``logits_to_keep``); wrappers
    such as peft's pass ``**kwargs`` through to the model they wrap."""
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _stopped(stop: Callable[[Tensor], bool] | None, tokens: Tensor, index: Tensor, t: int) -> Tensor:
    """``[A]`` bool: whether each row's tokens ``[: t + 1]`` complete a stop string (all False without any)."""
    if stop is None:
        return torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
    rows = tokens[index, : t + 1].cpu()  # [A, t+1]
    return torch.tensor([stop(row) for row in rows], dtype=torch.bool, device=index.device)


def _stop_checker(tokenizer: Any, stop: tuple[str, ...]) -> Callable[[Tensor], bool]:
    """Whether a stop string appears in the text of the last few tokens (enough to hold the longest one, as
    each token decodes to at least one character); checked after every step, so it finds the first one."""
    window = max(len(s) for s in stop) + 8

    def check(row: Tensor) -> bool:
        text = tokenizer.decode(row[-window:].tolist(), skip_special_tokens=True)
        return any(s in text for s in stop)

    return check


def _synced(model: nn.Module) -> bool:
    """Whether generation must run in lock-step over ranks (see :func:`dapo_pl.distributed.mark_synced_generation`)."""
    dist = torch.distributed
    flagged = bool(getattr(model, "_is_fsdp_managed_module", False))
    return flagged and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_done(done: bool, synced: bool, device: torch.device) -> bool:
    """``done`` here, and (synced) on every rank: one all-reduce per step."""
    if not synced:
        return done
    flag = torch.tensor([int(done)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token: responses could never end; set one in the tokenizer"
        )
    return [int(tokenizer.eos_token_id)]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad prompts to one length. Shapes: -> input_ids ``[P, Lmax]``, attention_mask ``[P, Lmax]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)

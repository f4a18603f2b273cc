"""The LM head in chunks of tokens: log-probs and entropies of chosen tokens from final hidden states.

A policy's log-probs need ``softmax(h W^T + b) / temperature`` only at the sampled token, and its entropy only as
one number per position, yet the plain path materialises float32 logits ``[tokens, vocab]`` (152k-vocabulary
models: 0.6 MB per token) plus as many again for log-softmax and entropy, and keeps them for the backward.
:func:`chunked_logprobs` computes both from the hidden states of the scored positions only, ``chunk_tokens``
positions at a time, keeping per token only its log-sum-exp and entropy; the backward recomputes each chunk's
logits. Peak memory is two float32 ``[chunk_tokens, V]`` buffers, whatever the number of tokens.

Everything here is a pure function of tensors; how the hidden states are taken out of a model lives in
:mod:`dapo_pl.update`.

Gradients (``z = (h W^T + b) / T`` per position, ``p = softmax(z)``, ``lp = z[y] - logsumexp(z)``,
``H = -sum_v p_v log p_v``):

- ``d lp / d z_v = [v == y] - p_v``;
- ``d H / d z_v = -p_v (log p_v + H)``;
- ``d / d(h W^T + b) = (d / d z) / T``, then the usual linear-layer chain rule for ``h``, ``W`` and ``b``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 at least: bf16/fp16 log-probs are too coarse for importance ratios (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h W^T + b) / T`` in the compute dtype. Shapes: ``h [c, H]``, ``weight [V, H]`` -> ``[c, V]``."""
    z = torch.nn.functional.linear(h, weight, bias).to(_compute_dtype(h.dtype))  # [c, V]
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedHead(torch.autograd.Function):
    """Autograd node of :func:`chunked_logprobs`: saves only ``[N]`` statistics, recomputes logits per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        tokens: Tensor,
        temperature: float,
        chunk_tokens: int,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        dtype = _compute_dtype(hidden.dtype)
        logprobs = hidden.new_empty(n, dtype=dtype)  # [N]
        entropy = hidden.new_empty(n, dtype=dtype)  # [N]
        lse = hidden.new_empty(n, dtype=dtype)  # [N]
        for s in range(0, n, chunk_tokens):
            z = _chunk_logits(hidden[s : s + chunk_tokens], weight, bias, temperature)  # [c, V]
            top = z.amax(dim=-1, keepdim=True)  # [c, 1]
            p = (z - top).exp_()  # [c, V], unnormalised
            total = p.sum(dim=-1, keepdim=True)  # [c, 1]
            p.div_(total)  # [c, V], softmax
            chunk_lse = (top + total.log()).squeeze(-1)  # [c]
            # H = lse - sum_v p_v z_v, as a batched dot product (no [c, V] product tensor)
            expected_z = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).reshape(-1)  # [c]
            lse[s : s + chunk_tokens] = chunk_lse
            entropy[s : s + chunk_tokens] = chunk_lse - expected_z
            picked = z.gather(-1, tokens[s : s + chunk_tokens].unsqueeze(-1)).squeeze(-1)  # [c]
            logprobs[s : s + chunk_tokens] = picked - chunk_lse
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_lp: Tensor | None, grad_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk_tokens
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # a frozen head (e.g. LoRA) gets no [V, H] buffer
        # Half-precision weights: accumulate their gradient over chunks in float32, round once at the end.
        acc = _compute_dtype(weight.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None  # [V]
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            dz = _chunk_logits(hidden[sl], weight, bias, temperature)  # [c, V], becomes d loss / d z in place
            dz.sub_(lse[sl].unsqueeze(-1))  # log p
            p = dz.exp()  # [c, V]
            _grad_wrt_z(dz, p, tokens[sl], entropy[sl], _part(grad_lp, sl), _part(grad_ent, sl))
            del p
            if temperature != 1.0:
                dz.div_(temperature)  # d / d(h W^T + b)
            if grad_h is not None:
                grad_h[sl] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)  # [c, H]
            if grad_w is not None:
                grad_w.addmm_(dz.t().to(acc), hidden[sl].to(acc))  # [V, H]
            if grad_b is not None:
                grad_b.add_(dz.sum(dim=0).to(acc))  # [V]
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def _part(grad: Tensor | None, sl: slice) -> Tensor | None:
    return grad[sl] if grad is not None else None


def _grad_wrt_z(
    logp: Tensor, p: Tensor, tokens: Tensor, entropy: Tensor, grad_lp: Tensor | None, grad_ent: Tensor | None
) -> None:
    """Overwrite ``logp`` (``[c, V]``) with ``d loss / d z``, given the upstream ``[c]`` gradients.

    ``-p_v (g_lp + g_H (log p_v + H)) + g_lp [v == y]``; either upstream gradient may be None (output unused).
    """
    if grad_ent is not None:
        logp.add_(entropy.unsqueeze(-1)).mul_(grad_ent.unsqueeze(-1).to(logp.dtype))  # g_H (log p + H)
        if grad_lp is not None:
            logp.add_(grad_lp.unsqueeze(-1).to(logp.dtype))
        logp.mul_(p).neg_()
    elif grad_lp is not None:
        torch.mul(p, -grad_lp.unsqueeze(-1).to(p.dtype), out=logp)
    else:
        logp.zero_()
    if grad_lp is not None:
        logp.scatter_add_(-1, tokens.unsqueeze(-1), grad_lp.unsqueeze(-1).to(logp.dtype))


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """Log-probs of ``tokens`` and entropies under ``softmax((hidden W^T + b) / temperature)``, in chunks.

    Differentiable in ``hidden``, ``weight`` and ``bias`` (the backward recomputes each chunk's logits). A tied
    head passes the embedding matrix as ``weight``: autograd adds this gradient to the embedding lookup's.
    Results are float32 for half-precision inputs (float64 stays float64). ``N = 0`` gives empty results
    and zero gradients for ``weight``/``bias``.

    Shapes:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; tokens: ``[N]`` integer ids;
        returns ``(logprobs [N], entropy [N])``.

    Raises:
        ValueError: ``temperature <= 0``, ``chunk_tokens < 1``, or mismatched shapes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"logprob_chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, {weight.shape[1]}] for a head weight of shape {tuple(weight.shape)}, "
            f"got {tuple(hidden.shape)}"
        )
    if tokens.shape != hidden.shape[:1]:
        raise ValueError(f"tokens must have shape [{hidden.shape[0]}], got {tuple(tokens.shape)}")
    out: tuple[Tensor, Tensor] = _ChunkedHead.apply(
        hidden, weight, bias, tokens.long(), float(temperature), int(chunk_tokens)
    )
    return out


def scatter_positions(values: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """Put per-position ``values`` back into a zero ``[b, L-1]`` grid (differentiable).

    Shapes: values ``[N]``; rows/cols ``[N]``; returns ``shape`` = ``[b, L-1]``.
    """
    grid = values.new_zeros(shape)  # [b, L-1]
    return grid.index_put((rows, cols), values)

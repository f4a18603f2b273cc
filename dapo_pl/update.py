"""The gradient side of one DAPO optimizer step, as free functions the LightningModule calls in order.

1. :func:`cut_batch`: rollout batch -> mini-batches (one optimizer step each) -> micro-batches (token budget),
   with the overlong-filtering loss weight applied; responses left without a loss token never run.
2. :func:`score_old`: old (and reference) log-probs of every micro-batch, no gradient, plus entropy and the
   engine-vs-trainer log-prob gap. Skipped when the update is exactly on-policy (:func:`is_on_policy`): the old
   log-probs are then the loss pass's own, detached, and the metrics come from that pass. With
   ``old_logprobs: engine`` the engine's log-probs are the old ones instead (:func:`use_engine_logprobs`).
   Then the rollout correction (:func:`correct_rollouts`): TIS weights and the MIS-masked loss mask, before the
   denominator is counted; on the on-policy path only TIS, from the loss pass (:func:`on_policy_weights`).
3. :func:`accumulate_gradients`: loss and backward of every micro-batch of one mini-batch, all sharing one
   token-mean denominator (``num_tokens``) so that their sum is the mini-batch loss.

Every pass scores only response positions through :func:`score_tokens`: the model's final hidden states at those
positions go through the LM head in chunks of ``logprob_chunk_tokens`` (:mod:`dapo_pl.head`), so no
``[tokens, vocab]`` logits tensor is ever built.
Clipping and the optimizer step stay in the module, where Lightning's optimizer wrappers live.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dapo_pl.batch import (
    MicroBatch,
    RolloutBatch,
    collate,
    has_response,
    mini_batch_slices,
    padding_micro_batch,
    split_by_token_budget,
)
from dapo_pl.distributed import DataParallel
from dapo_pl.head import DEFAULT_CHUNK_TOKENS, chunked_logprobs, scatter_positions
from dapo_pl.objective import (
    CORRECTION_MAX_KEYS,
    CORRECTION_SUM_KEYS,
    aggregate,
    clip_fractions,
    combine_correction_sums,
    kl_penalty,
    logprobs_from_logits,
    policy_loss,
    rollout_correction,
    rollout_correction_metrics,
    rollout_correction_sums,
    token_entropy,
)
from dapo_pl.sampling import overlong_filter_mask


def cut_batch(
    batch: RolloutBatch, *, mini_batch_size: int, max_tokens: int, pad_id: int, overlong_filtering: bool
) -> list[list[MicroBatch]]:
    """Mini-batches of ``mini_batch_size`` responses, each a list of micro-batches within ``max_tokens``.

    Responses without a loss token (truncated ones under overlong filtering, empty ones) are left out of the
    micro-batches: they add nothing to any loss term, token count or row count, so the gradient is the same
    without their forward and backward passes (truncated responses are the longest of a batch). The mini-batches
    are cut first, so each optimizer step keeps its responses; one left with none gets a
    :func:`~dapo_pl.batch.padding_micro_batch` (zero gradients: the optimizer still steps, as before).
    """
    weight = overlong_filter_mask(batch.truncated) if overlong_filtering else torch.ones(len(batch))  # [B]
    mini_batches = []
    for sl in mini_batch_slices(len(batch), mini_batch_size):
        idx = [i for i in range(len(batch))[sl] if weight[i] > 0 and has_response(batch, i)]
        if not idx:
            mini_batches.append([padding_micro_batch(pad_id)])
            continue
        parts = split_by_token_budget([len(batch.sequences[i]) for i in idx], max_tokens)
        mini_batches.append([collate(batch, [idx[j] for j in part], pad_id, weight) for part in parts])
    return mini_batches


def forward_logits(model: torch.nn.Module, mb: MicroBatch) -> Tensor:
    """Logits ``[b, L-1, V]``, float32 at least: position t scores token t+1. The fallback of :func:`score_tokens`."""
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    logits = out.logits[:, :-1]  # [b, L-1, V]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# Config fields of transformers models that transform logits after the head: the chunked head would skip them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output embedding if :func:`score_tokens` can compute it in chunks, else None.

    That needs an ``nn.Linear`` head (tied or not) whose output is the logits as they are: a config that
    soft-caps or scales the logits after the head (Gemma 2, Cohere, Granite, ...) takes the full-logits path.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(model, "config", None)
    transformed = any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS)
    return head if isinstance(head, torch.nn.Linear) and not transformed else None


@contextmanager
def _head_forward(head: torch.nn.Module, forward: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace ``head``'s forward for one call of the model (the instance attribute shadows the class's)."""
    previous = head.__dict__.get("forward")
    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous  # type: ignore[method-assign]


def score_tokens(
    model: torch.nn.Module, mb: MicroBatch, temperature: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies (at ``temperature``) of the response tokens of ``mb``; 0 at other positions.

    Only response positions reach the LM head, ``chunk_tokens`` at a time (:func:`dapo_pl.head.chunked_logprobs`),
    so no ``[b, L, V]`` logits exist. The head runs *inside* the model's forward, in place of its output
    embedding, so sharding strategies (FSDP2 unshards the root module's parameters in its forward hook) hand it
    the full weight, and the model's own code (gradient checkpointing, tied embeddings) is unchanged. Models
    without a plain linear head fall back to full logits (:func:`forward_logits`), with a warning.

    Shapes: ``mb.input_ids`` ``[b, L]``; returns ``(logprobs [b, L-1], entropy [b, L-1])``.
    """
    head = linear_head(model)
    mask = mb.response_mask != 0  # [b, L-1]
    if head is None:
        warnings.warn(
            f"{type(model).__name__}: the output embedding is not a plain nn.Linear; log-probs use full "
            "[b, L, V] logits (memory grows with tokens x vocabulary)",
            stacklevel=2,
        )
        logits = forward_logits(model, mb) / temperature  # [b, L-1, V]
        logprobs = logprobs_from_logits(logits, mb.input_ids[:, 1:])  # [b, L-1]
        zero = logprobs.new_zeros(())
        return torch.where(mask, logprobs, zero), torch.where(mask, token_entropy(logits), zero)
    rows, cols = mask.nonzero(as_tuple=True)  # [N], [N]
    tokens = mb.input_ids[rows, cols + 1]  # [N]

    def scored_head(hidden: Tensor) -> Tensor:  # [b, L, H] -> [1, N, 2]
        lp, ent = chunked_logprobs(hidden[rows, cols], head.weight, head.bias, tokens,
                                   temperature=temperature, chunk_tokens=chunk_tokens)  # fmt: skip
        return torch.stack([lp, ent], dim=-1).unsqueeze(0)  # [1, N, 2]: returned as the model's "logits"

    with _head_forward(head, scored_head):
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    packed = out.logits[0]  # [N, 2]
    shape = (mask.shape[0], mask.shape[1])
    return scatter_positions(packed[:, 0], rows, cols, shape), scatter_positions(
        packed[:, 1], rows, cols, shape
    )


@dataclass
class ScoreStats:
    """Numerators and token counts of the scoring metrics, summed over micro-batches (and ranks).

    ``train/entropy``: mean entropy (at the sampling temperature) over response tokens;
    ``rollout/logprob_abs_diff_mean``: mean ``|trainer - engine|`` log-prob over tokens the engine scored.
    Both cover the responses that enter the update (:func:`cut_batch` leaves out those without a loss token);
    a metric with no token to average is not reported.
    """

    entropy_sum: float = 0.0
    tokens: float = 0.0
    gap_sum: float = 0.0
    gap_tokens: float = 0.0

    def add(self, mb: MicroBatch, logprobs: Tensor, entropy: Tensor) -> None:
        """Add one micro-batch's ``[b, L-1]`` (detached) log-probs and entropies."""
        self.entropy_sum += float((entropy * mb.response_mask).sum())
        self.tokens += float(mb.response_mask.sum())
        self.gap_sum += float(((logprobs - mb.rollout_logprobs).abs() * mb.rollout_mask).sum())
        self.gap_tokens += float(mb.rollout_mask.sum())

    def metrics(self, all_reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        """The metrics; ``all_reduce`` (data-parallel ranks: a collective, every rank calls it) sums first."""
        sums = [self.entropy_sum, self.tokens, self.gap_sum, self.gap_tokens]
        ent_sum, ent_n, diff_sum, diff_n = all_reduce(sums) if all_reduce is not None else sums
        metrics = {"train/entropy": ent_sum / ent_n} if ent_n else {}
        if diff_n:
            metrics["rollout/logprob_abs_diff_mean"] = diff_sum / diff_n
        return metrics


def is_on_policy(ppo_epochs: int, num_mini_batches: int, carried_group_frac: float) -> bool:
    """Whether the one optimizer step of this batch starts from the weights that would score old log-probs.

    One epoch, one mini-batch and no group carried over from an earlier step: the old log-probs are then the
    current ones (detached), so :func:`score_old`'s separate forward pass is skipped.
    """
    return ppo_epochs == 1 and num_mini_batches == 1 and carried_group_frac == 0.0


@torch.no_grad()
def score_old(
    policy: torch.nn.Module,
    micro_batches: list[MicroBatch],
    temperature: float,
    ref_policy: torch.nn.Module | None = None,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float]:
    """Attach ``old_logprobs`` (and ``ref_logprobs``) to every micro-batch; return entropy and engine-gap metrics.

    ``all_reduce`` (data-parallel ranks) sums the metrics' numerators and token counts over ranks, so the
    metrics describe the whole batch; None: this rank's micro-batches only.
    """
    stats = ScoreStats()
    for mb in micro_batches:
        mb.old_logprobs, entropy = score_tokens(policy, mb, temperature, chunk_tokens)  # [b, L-1] each
        stats.add(mb, mb.old_logprobs, entropy)
    if ref_policy is not None:
        score_reference(ref_policy, micro_batches, temperature, chunk_tokens)
    return stats.metrics(all_reduce)


@torch.no_grad()
def score_reference(
    ref_policy: torch.nn.Module,
    micro_batches: list[MicroBatch],
    temperature: float,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> None:
    """Attach the reference policy's ``ref_logprobs`` ``[b, L-1]`` (for the KL penalty) to every micro-batch."""
    for mb in micro_batches:
        mb.ref_logprobs = score_tokens(ref_policy, mb, temperature, chunk_tokens)[0]


def count_rows(micro_batches: list[MicroBatch]) -> int:
    """Non-empty responses (rows with at least one loss token) in ``micro_batches``."""
    return sum(int((mb.loss_mask.sum(dim=1) > 0).sum()) for mb in micro_batches)


def _row_weights(micro_batches: list[MicroBatch], num_rows: float | None = None) -> list[float]:
    """For seq-mean aggregations: each micro-batch's share of the mini-batch's non-empty responses, so that
    the weighted sum of micro-batch means is the mini-batch mean however the responses were split.

    ``num_rows``: the denominator shared by data-parallel ranks (global non-empty rows / gradient-averaging world
    size, the seq-mean twin of :func:`dapo_pl.objective.token_mean_denominator`); None: this rank's own count.
    """
    rows = [int((mb.loss_mask.sum(dim=1) > 0).sum()) for mb in micro_batches]
    total = max(sum(rows), 1) if num_rows is None else num_rows
    return [r / total for r in rows]


def accumulate_gradients(
    policy: torch.nn.Module,
    micro_batches: list[MicroBatch],
    *,
    temperature: float,
    algo: Any,
    num_tokens: Tensor | None,
    backward: Callable[[Tensor], None],
    num_rows: float | None = None,
    on_policy_stats: ScoreStats | None = None,
) -> dict[str, float]:
    """Backward the loss of every micro-batch of one mini-batch; return loss and clip statistics.

    ``num_tokens`` is the mini-batch's shared token-mean denominator (from
    :func:`dapo_pl.objective.token_mean_denominator`), or None for the seq-mean aggregations, which weight each
    micro-batch by its share of responses instead (of ``num_rows`` when given: see :func:`_row_weights`).
    ``algo`` is the module's ``AlgorithmConfig``.

    ``on_policy_stats``: the update is exactly on-policy (:func:`is_on_policy`) and :func:`score_old` was skipped:
    the old log-probs are this forward's own, detached, and its entropy and engine-gap sums go into the given
    :class:`ScoreStats`. Otherwise every micro-batch must carry ``old_logprobs``.
    """
    weights = _row_weights(micro_batches, num_rows) if num_tokens is None else [1.0] * len(micro_batches)
    tokens = max(sum(float(mb.loss_mask.sum()) for mb in micro_batches), 1.0)
    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clipfrac_high": 0.0, "clipfrac_low": 0.0}
    for mb, weight in zip(micro_batches, weights, strict=True):
        logprobs, entropy = score_tokens(policy, mb, temperature, algo.logprob_chunk_tokens)  # [b, L-1] each
        if on_policy_stats is not None:
            mb.old_logprobs = logprobs.detach()
            on_policy_stats.add(mb, mb.old_logprobs, entropy.detach())
            mb.is_weights = on_policy_weights(mb, algo.rollout_correction)  # [b, L-1] or None
        if mb.old_logprobs is None:
            raise ValueError(
                "a micro-batch has no old_logprobs: call score_old first, or pass on_policy_stats"
            )
        pg = weight * policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask, eps_low=algo.eps_low, eps_high=algo.eps_high,
            clip_ratio_c=algo.clip_ratio_c, agg=algo.loss_agg, num_tokens=num_tokens, is_weights=mb.is_weights,
        )  # fmt: skip
        loss = pg
        if mb.ref_logprobs is not None and algo.kl_coef > 0:
            per_token_kl = kl_penalty(logprobs, mb.ref_logprobs, algo.kl_estimator)  # [b, L-1]
            kl = weight * aggregate(per_token_kl, mb.loss_mask, algo.loss_agg, num_tokens)
            loss = loss + algo.kl_coef * kl
            totals["kl"] += float(kl.detach())
        backward(loss)
        high, low = clip_fractions(
            logprobs.detach(),
            mb.old_logprobs,
            mb.advantages,
            mb.loss_mask,
            eps_low=algo.eps_low,
            eps_high=algo.eps_high,
        )
        share = float(mb.loss_mask.sum()) / tokens
        totals["loss"] += float(loss.detach())
        totals["pg_loss"] += float(pg.detach())
        totals["clipfrac_high"] += float(high) * share
        totals["clipfrac_low"] += float(low) * share
    return totals


def _correction_kwargs(correction: Any) -> dict[str, Any]:
    """The keyword scalars of :func:`dapo_pl.objective.rollout_correction` from a ``RolloutCorrectionConfig``."""
    return {"mode": correction.mode, "level": correction.level, "clip": correction.clip, "low": correction.low,
            "high": correction.high}  # fmt: skip


def _correction_args(mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if mb.old_logprobs is None:
        raise ValueError("the rollout correction needs the micro-batch's old_logprobs (score_old first)")
    return mb.old_logprobs, mb.rollout_logprobs, mb.rollout_mask, mb.loss_mask


def correction_metrics(
    micro_batches: list[MicroBatch], correction: Any, dp: DataParallel
) -> dict[str, float]:
    """The ``rollout/*`` correction metrics of these micro-batches (old log-probs set, loss masks before MIS).

    Sums over the micro-batches, then over ``dp``'s ranks (a collective: every rank calls it, with its padding
    micro-batches if it has nothing else); the maximum is reduced with max.
    """
    kw = _correction_kwargs(correction)
    parts = [rollout_correction_sums(*_correction_args(mb), **kw) for mb in micro_batches]
    sums = combine_correction_sums(parts) if parts else dict.fromkeys(CORRECTION_SUM_KEYS, 0.0)
    keys = [k for k in sums if k not in CORRECTION_MAX_KEYS]
    reduced = dict(zip(keys, dp.sum([sums[k] for k in keys]), strict=True))
    reduced.update(zip(CORRECTION_MAX_KEYS, dp.max([sums[k] for k in CORRECTION_MAX_KEYS]), strict=True))
    return rollout_correction_metrics(reduced)


def correct_rollouts(micro_batches: list[MicroBatch], correction: Any, dp: DataParallel) -> dict[str, float]:
    """Apply the rollout correction to every micro-batch (its ``old_logprobs`` set); return the ``rollout/*`` metrics.

    Sets ``mb.is_weights`` (TIS) and replaces ``mb.loss_mask`` by the MIS-corrected mask
    (:func:`dapo_pl.objective.rollout_correction`), so call it before the token-mean denominator is counted: the
    masked tokens then leave it. ``correction`` is the module's ``RolloutCorrectionConfig``; with mode ``off`` only
    the metrics (:func:`correction_metrics`, a collective) are computed.
    """
    metrics = correction_metrics(micro_batches, correction, dp)  # of the masks before MIS
    if correction.mode != "off":
        for mb in micro_batches:
            mb.is_weights, mb.loss_mask = rollout_correction(
                *_correction_args(mb), **_correction_kwargs(correction)
            )
    return metrics


def on_policy_weights(mb: MicroBatch, correction: Any) -> Tensor | None:
    """TIS weights ``[b, L-1]`` of a micro-batch whose old log-probs are the loss pass's own (on-policy path).

    Only TIS can run there: an MIS mask would change the token-mean denominator counted before the loss pass.
    """
    if correction.mode == "off":
        return None
    if correction.mode != "tis":
        raise ValueError(
            f"rollout_correction.mode={correction.mode!r} masks tokens: it needs the old-log-prob pass"
        )
    return rollout_correction(*_correction_args(mb), **_correction_kwargs(correction))[0]


def use_engine_logprobs(micro_batches: list[MicroBatch]) -> None:
    """``old_logprobs: engine`` (bypass): the engine's log-probs are the old policy wherever it reported one.

    Tokens without one (carried-over groups) keep the trainer's ``old_logprobs`` when they were scored; if they
    were not, a loss token without any old log-prob is an error naming the cause.
    """
    for mb in micro_batches:
        has_engine = mb.rollout_mask != 0  # [b, L-1]
        if mb.old_logprobs is None:
            if bool(((mb.loss_mask != 0) & ~has_engine).any()):
                raise ValueError(
                    "model.algorithm.old_logprobs='engine': a response to train on has no engine log-probs (the "
                    "rollout engine returned none); set old_logprobs: trainer or make the engine return log-probs"
                )
            mb.old_logprobs = mb.rollout_logprobs
        else:
            mb.old_logprobs = torch.where(has_engine, mb.rollout_logprobs, mb.old_logprobs)  # [b, L-1]

"""The gradient side of one DAPO optimizer step, as free functions the LightningModule calls in order.

1. :func:`cut_batch`: rollout batch -> mini-batches (one optimizer step each) -> micro-batches (token budget),
   with the overlong-filtering loss weight applied.
2. :func:`score_old`: old (and reference) log-probs of every micro-batch, no gradient, plus entropy and the
   engine-vs-trainer log-prob gap.
3. :func:`accumulate_gradients`: loss and backward of every micro-batch of one mini-batch, all sharing one
   token-mean denominator (``num_tokens``) so that their sum is the mini-batch loss.
Clipping and the optimizer step stay in the module, where Lightning's optimizer wrappers live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dapo_pl.batch import MicroBatch, RolloutBatch, collate, mini_batch_slices, split_by_token_budget
from dapo_pl.distributed import DataParallel
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
    """Mini-batches of ``mini_batch_size`` responses, each a list of micro-batches within ``max_tokens``."""
    weight = overlong_filter_mask(batch.truncated) if overlong_filtering else torch.ones(len(batch))  # [B]
    mini_batches = []
    for sl in mini_batch_slices(len(batch), mini_batch_size):
        idx = list(range(len(batch)))[sl]
        parts = split_by_token_budget([len(batch.sequences[i]) for i in idx], max_tokens)
        mini_batches.append([collate(batch, [idx[j] for j in part], pad_id, weight) for part in parts])
    return mini_batches


def forward_logits(model: torch.nn.Module, mb: MicroBatch) -> Tensor:
    """Float32 logits ``[b, L-1, V]``: position t scores token t+1."""
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    return out.logits[:, :-1].float()


@torch.no_grad()
def score_old(
    policy: torch.nn.Module,
    micro_batches: list[MicroBatch],
    temperature: float,
    ref_policy: torch.nn.Module | None = None,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Attach ``old_logprobs`` (and ``ref_logprobs``) to every micro-batch; return entropy and engine-gap metrics.

    ``all_reduce`` (data-parallel ranks) sums the metrics' numerators and token counts over ranks, so the
    metrics describe the whole batch; None: this rank's micro-batches only.
    """
    ent_sum = ent_n = diff_sum = diff_n = 0.0
    for mb in micro_batches:
        logits = forward_logits(policy, mb)  # [b, L-1, V]
        mb.old_logprobs = logprobs_from_logits(logits, mb.input_ids[:, 1:], temperature)  # [b, L-1]
        ent_sum += float((token_entropy(logits) * mb.response_mask).sum())
        ent_n += float(mb.response_mask.sum())
        diff_sum += float(((mb.old_logprobs - mb.rollout_logprobs).abs() * mb.rollout_mask).sum())
        diff_n += float(mb.rollout_mask.sum())
        if ref_policy is not None:
            ref_logits = forward_logits(ref_policy, mb)  # [b, L-1, V]
            mb.ref_logprobs = logprobs_from_logits(ref_logits, mb.input_ids[:, 1:], temperature)  # [b, L-1]
    if all_reduce is not None:
        ent_sum, ent_n, diff_sum, diff_n = all_reduce([ent_sum, ent_n, diff_sum, diff_n])
    metrics = {"train/entropy": ent_sum / max(ent_n, 1.0)}
    if diff_n:
        metrics["rollout/logprob_abs_diff_mean"] = diff_sum / diff_n
    return metrics


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
) -> dict[str, float]:
    """Backward the loss of every micro-batch of one mini-batch; return loss and clip statistics.

    ``num_tokens`` is the mini-batch's shared token-mean denominator (from
    :func:`dapo_pl.objective.token_mean_denominator`), or None for the seq-mean aggregations, which weight each
    micro-batch by its share of responses instead (of ``num_rows`` when given: see :func:`_row_weights`).
    ``algo`` is the module's ``AlgorithmConfig``.
    """
    weights = _row_weights(micro_batches, num_rows) if num_tokens is None else [1.0] * len(micro_batches)
    tokens = max(sum(float(mb.loss_mask.sum()) for mb in micro_batches), 1.0)
    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clipfrac_high": 0.0, "clipfrac_low": 0.0}
    for mb, weight in zip(micro_batches, weights, strict=True):
        assert mb.old_logprobs is not None
        logprobs = logprobs_from_logits(
            forward_logits(policy, mb), mb.input_ids[:, 1:], temperature
        )  # [b, L-1]
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


def correct_rollouts(micro_batches: list[MicroBatch], correction: Any, dp: DataParallel) -> dict[str, float]:
    """Apply the rollout correction to every micro-batch (its ``old_logprobs`` set); return the ``rollout/*`` metrics.

    Sets ``mb.is_weights`` (TIS) and replaces ``mb.loss_mask`` by the MIS-corrected mask
    (:func:`dapo_pl.objective.rollout_correction`), so call it before the token-mean denominator is counted: the
    masked tokens then leave it. ``correction`` is the module's ``RolloutCorrectionConfig``; with mode ``off`` only
    the metrics are computed. The metric sums are reduced over the micro-batches and over ``dp``'s ranks (a
    collective: every rank calls it, with its padding micro-batches if it has nothing else).
    """
    kw = {"mode": correction.mode, "level": correction.level, "clip": correction.clip, "low": correction.low,
          "high": correction.high}  # fmt: skip
    parts = []
    for mb in micro_batches:
        if mb.old_logprobs is None:
            raise ValueError("correct_rollouts needs the micro-batches' old_logprobs (score_old first)")
        args = (mb.old_logprobs, mb.rollout_logprobs, mb.rollout_mask, mb.loss_mask)
        parts.append(rollout_correction_sums(*args, **kw))  # of the mask before MIS
        if correction.mode != "off":
            mb.is_weights, mb.loss_mask = rollout_correction(*args, **kw)  # [b, L-1] each
    sums = combine_correction_sums(parts) if parts else dict.fromkeys(CORRECTION_SUM_KEYS, 0.0)
    keys = [k for k in sums if k not in CORRECTION_MAX_KEYS]
    reduced = dict(zip(keys, dp.sum([sums[k] for k in keys]), strict=True))
    reduced.update(zip(CORRECTION_MAX_KEYS, dp.max([sums[k] for k in CORRECTION_MAX_KEYS]), strict=True))
    return rollout_correction_metrics(reduced)


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

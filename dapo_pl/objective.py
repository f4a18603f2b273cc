"""The DAPO objective as pure functions of tensors.

Everything here takes tensors and keyword scalars and returns tensors: no module state, no config
objects. The LightningModule turns its config into scalars once and calls these functions.

Where each technique of DAPO (Yu et al., 2025, arXiv 2503.14476) lives:

- Group-relative advantage (GRPO, kept by DAPO): :func:`group_advantages`.
- Clip-Higher (Sec. 3.1), decoupled ``eps_low`` / ``eps_high``: :func:`policy_loss`.
- Dynamic sampling (Sec. 3.2): not here, it is a data-side filter; it relies on groups with zero reward
  variance having zero advantage, which :func:`group_advantages` guarantees (no nan for ties).
- Token-level policy-gradient loss (Sec. 3.3): ``agg="token-mean"`` in :func:`aggregate`, with the one
  denominator per optimizer step computed by :func:`token_mean_denominator` (micro-batches x ranks).
- Overlong reward shaping (Sec. 3.4, Eq. 13): :func:`overlong_penalty`. Overlong *filtering* is a loss
  mask built on the data side; masked tokens leave the denominator automatically.
- Metrics: :func:`clip_fractions`, :func:`token_entropy`; log-probs: :func:`logprobs_from_logits`.
- Not in the paper, every peer ships it: rollout correction of the engine/trainer mismatch (TIS weights, MIS /
  IcePop masks), :func:`rollout_correction` and its metrics; off by default (docs/rollout-correction.md).

Departures from the paper, all optional or harmless by default:

- ``clip_ratio_c`` (dual clip, Ye et al. 2020, as in verl) is not in DAPO; ``None`` (off) by default.
- DAPO drops the KL term (Sec. 2.3); :func:`kl_penalty` exists for ``beta > 0`` baselines only.
- ``group_advantages`` adds ``eps`` to the std (the paper divides by the bare std) and uses the unbiased
  std, which the paper does not specify (torch's and verl's default).
- ``overlong_penalty`` has a ``factor`` (the paper's is 1) and accepts ``cache_len == 0`` (hard cut-off).
- The log-ratio of loss-masked tokens is set to 0 before ``exp`` so padding with garbage log-probs can
  never put ``inf``/``nan`` into the value or the gradient; it does not change any unmasked number.
- A mini-batch with no loss tokens gives a loss of 0 (the denominator is clamped to 1 token), not nan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k3")


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {', '.join(map(repr, AGGREGATIONS))}; got {agg!r}")


def group_advantages(rewards: Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """Group-relative advantages: each reward minus its group's mean, optionally over the group's std.

    ``(r - mean) / (std + eps)`` with the unbiased std (``correction=1``, torch's default), or ``r - mean``
    with ``scale_by_std=False``. A group whose rewards are all equal gets zeros (``0 / (0 + eps)``).

    Shapes:
        rewards: ``[num_groups, G]``, one row per prompt, one column per sampled response.
        returns: ``[num_groups, G]``, same dtype.

    Raises:
        ValueError: rewards not 2-D, or ``G < 2`` with ``scale_by_std`` (a group of one response has no
            group baseline and its unbiased std is nan).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [num_groups, G], got {tuple(rewards.shape)}")
    group_size = rewards.shape[1]
    if scale_by_std and group_size < 2:
        raise ValueError(
            f"group size G (rewards.shape[1]) must be >= 2 when scale_by_std=True, got G={group_size}: "
            "a group of one response has no group baseline (its unbiased std is nan)"
        )
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # [num_groups, G]
    if not scale_by_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)  # [num_groups, G]


def token_mean_denominator(
    mask: Tensor | Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    grad_average_world_size: int = 1,
) -> Tensor:
    """The token-mean denominator of one optimizer step: the single place this rule lives.

    Pass the loss masks of *every* micro-batch of the optimizer step's mini-batch on this rank (one tensor,
    or a sequence of them; their shapes may differ). The masked tokens are counted (exactly, in int64),
    summed over data-parallel ranks with ``all_reduce``, clamped to at least 1, and divided by
    ``grad_average_world_size``. Each micro-batch then uses ``num_tokens=`` this value, so the sum of the
    micro-batch losses is the mini-batch loss and the gradient does not depend on how the mini-batch was
    split (the bug class verl's legacy path, TRL and ms-swift each shipped).

    Why divide by the world size: DDP *averages* gradients over ranks. To end up with
    ``global_masked_sum / global_tokens`` each rank's loss must be ``local_masked_sum * world / global_tokens``.
    Hand-worked, 2 ranks: rank 0 has 3 tokens with per-token losses summing to 6, rank 1 has 1 token
    with loss 2; the wanted token mean is ``(6 + 2) / 4 = 2``. Denominator ``= 4 / 2 = 2``; rank 0's loss
    is ``6 / 2 = 3``, rank 1's is ``2 / 2 = 1``; DDP averages ``(3 + 1) / 2 = 2``. Dividing by the global
    count alone would give ``1``, half the truth. Pass ``grad_average_world_size=1`` with a strategy that
    sums gradients instead.

    Zero tokens anywhere (every response filtered out): the count is clamped to 1, every masked sum is 0,
    so the loss is 0 and no gradient flows, rather than ``0 / 0 = nan`` poisoning the weights.

    Shapes:
        mask: ``[B, T]`` (any shape) bool or 0/1 float, or a sequence of such tensors.
        returns: ``[]`` (0-dim) float64 on the masks' device.

    Args:
        all_reduce: called once with the local 0-dim int64 count; must return the sum over the
            data-parallel ranks (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``). ``None``: 1 rank.
        grad_average_world_size: the number of ranks whose gradients are averaged (DDP/FSDP world size).
    """
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    if not masks:
        raise ValueError("mask must be a tensor or a non-empty sequence of tensors, got an empty sequence")
    if grad_average_world_size < 1:
        raise ValueError(f"grad_average_world_size must be >= 1, got {grad_average_world_size}")
    # Counting in int64 is exact for any batch; a float32 count is not beyond 2**24 tokens.
    count = torch.stack([(m != 0).sum() for m in masks]).sum()  # []
    if all_reduce is not None:
        count = all_reduce(count)  # []
    return count.clamp(min=1).to(torch.float64) / grad_average_world_size  # []


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    agg: str,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token quantity to a scalar; shared by the policy loss, the KL term and the entropy.

    - ``"token-mean"``: masked sum / ``num_tokens`` (DAPO Sec. 3.3). Without ``num_tokens`` the
      denominator is this batch's own count (:func:`token_mean_denominator` of ``mask``), right only when
      this call sees the whole mini-batch on one rank.
    - ``"seq-mean-token-mean"``: mean over non-empty rows of each row's token mean (the original GRPO).
    - ``"seq-mean-token-sum"``: mean over non-empty rows of each row's masked token sum.

    Masked positions are dropped with ``where`` (not multiplied by 0), so a non-finite value there does
    not reach the result. Rows with no masked token are skipped; no token at all gives 0.

    Shapes:
        per_token: ``[B, T]``; mask: ``[B, T]`` bool or 0/1 float; returns ``[]``.

    Raises:
        ValueError: unknown ``agg``, shape mismatch, a Python ``num_tokens <= 0`` (a tensor is not
            inspected: that would synchronise with the GPU), or ``num_tokens`` with a ``seq-mean-*``
            aggregation (those have no token denominator to share; a given one would be silently ignored).
    """
    _check_agg(agg)
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token and mask must both be [B, T] with equal shapes, got per_token "
            f"{tuple(per_token.shape)} and mask {tuple(mask.shape)}"
        )
    keep = mask != 0  # [B, T]
    masked = torch.where(keep, per_token, torch.zeros_like(per_token))  # [B, T]
    if agg == "token-mean":
        if num_tokens is None:
            num_tokens = token_mean_denominator(keep)
        elif isinstance(num_tokens, (int, float)) and num_tokens <= 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        denominator = torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device)  # []
        return masked.sum() / denominator
    if num_tokens is not None:
        raise ValueError(f"num_tokens only applies to agg='token-mean', got agg={agg!r}")
    row_tokens = keep.sum(dim=1)  # [B]
    row_values = masked.sum(dim=1)  # [B]
    if agg == "seq-mean-token-mean":
        row_values = row_values / row_tokens.clamp(min=1)  # [B]
    # Empty rows already hold 0; they only must not count in the number of sequences.
    return row_values.sum() / (row_tokens > 0).sum().clamp(min=1)


def _check_clip_args(eps_low: float, eps_high: float, clip_ratio_c: float | None) -> None:
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (the lower clip bound 1 - eps_low must be > 0), got {eps_low}")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")


def _ratio_and_advantages(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Check shapes; return the importance ratio (1 on masked tokens) and advantages broadcast to [B, T]."""
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be [B, T] with equal shapes, got logprobs "
            f"{tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages.unsqueeze(1)  # [B, 1]
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )
    log_ratio = logprobs - old_logprobs  # [B, T]
    # Padding may carry any log-prob; exp of it could be inf and 0 * inf = nan in value or gradient.
    log_ratio = torch.where(mask != 0, log_ratio, torch.zeros_like(log_ratio))  # [B, T]
    return torch.exp(log_ratio), advantages.expand_as(logprobs)  # [B, T], [B, T]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    is_weights: Tensor | None = None,
) -> Tensor:
    """Clipped policy-gradient loss with decoupled clip bounds (Clip-Higher), to be minimised.

    Per token, with ``r = exp(logprobs - old_logprobs)``::

        loss = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        if clip_ratio_c is not None and A < 0:  loss = min(loss, -A * clip_ratio_c)

    i.e. the negative of DAPO's ``min(r A, clip(r) A)``. The gradient w.r.t. a token's log-prob is
    ``-A * r`` (times the aggregation weight) where the unclipped branch is active, else 0. The tokens are
    then reduced by :func:`aggregate` with ``agg``; pass ``num_tokens`` from
    :func:`token_mean_denominator` whenever the mini-batch is split over micro-batches or ranks.

    Shapes:
        logprobs, old_logprobs: ``[B, T]`` log-probs of the sampled tokens under the current / rollout
            policy; old_logprobs carries no gradient.
        advantages: ``[B]`` (one per response) or ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1 float, 1 on response tokens that count in the loss.
        is_weights: ``[B, T]`` or None; the rollout-correction (TIS) weight of each token's term, detached
            (:func:`rollout_correction`); None: weight 1.
        returns: ``[]``.

    Raises:
        ValueError: a negative ``eps_low``/``eps_high``, ``eps_low >= 1``, ``clip_ratio_c <= 1``, unknown
            ``agg``, or mismatched shapes.
    """
    _check_clip_args(eps_low, eps_high, clip_ratio_c)
    _check_agg(agg)
    ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)  # [B, T], [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    if clip_ratio_c is not None:
        # Dual clip: with A < 0 a huge ratio would make the loss (and the step) unbounded.
        capped = torch.minimum(per_token, -adv * clip_ratio_c)  # [B, T]
        per_token = torch.where(adv < 0, capped, per_token)  # [B, T]
    if is_weights is not None:  # rollout correction (TIS): a detached weight on each token's term
        if is_weights.shape != per_token.shape:
            raise ValueError(
                f"is_weights must be [B, T] = {tuple(per_token.shape)}, got {tuple(is_weights.shape)}"
            )
        per_token = per_token * is_weights.detach()  # [B, T]
    return aggregate(per_token, mask, agg, num_tokens)


@torch.no_grad()
def clip_fractions(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """Share of loss tokens whose gradient the clip removes, at the upper and at the lower bound.

    ``clipfrac_high``: tokens with ``A > 0`` and ``r > 1 + eps_high`` (Clip-Higher's bound);
    ``clipfrac_low``: tokens with ``A < 0`` and ``r < 1 - eps_low``. Both are over the masked tokens of
    this batch (a mean, for logging); 0 when there is none. Dual-clip capping is not counted.

    Shapes:
        logprobs, old_logprobs, mask: ``[B, T]``; advantages: ``[B]`` or ``[B, T]``.
        returns: two ``[]`` tensors ``(clipfrac_high, clipfrac_low)``, detached.
    """
    _check_clip_args(eps_low, eps_high, None)
    ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)  # [B, T], [B, T]
    keep = mask != 0  # [B, T]
    count = keep.sum().clamp(min=1).to(ratio.dtype)  # []
    high = (adv > 0) & (ratio > 1.0 + eps_high) & keep  # [B, T]
    low = (adv < 0) & (ratio < 1.0 - eps_low) & keep  # [B, T]
    return high.sum().to(ratio.dtype) / count, low.sum().to(ratio.dtype) / count


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment (DAPO Sec. 3.4, Eq. 13), added to the correctness reward.

    With ``L = max_len`` and ``C = cache_len``::

        0                              if len <= L - C
        factor * ((L - C) - len) / C   if L - C < len <= L     (linear from 0 down to -factor)
        -factor                        if len > L

    ``cache_len == 0`` means no soft zone: 0 up to ``max_len``, ``-factor`` beyond (no division by 0).
    Hand-worked, ``max_len=20480, cache_len=4096`` (the paper's 16k + 4k): lengths 16384, 18432, 20480,
    20481 give 0, -0.5, -1, -1.

    Shapes:
        lengths: any shape, response lengths in tokens (int or float).
        returns: same shape; ``lengths``' dtype if floating, float64 for integer lengths (rewards are float64
            everywhere: in float32, ``len=16602, L=20480, C=7018`` was 7e-9 off).

    Raises:
        ValueError: ``max_len <= 0``, ``cache_len < 0``, ``cache_len > max_len`` or ``factor < 0``.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if cache_len < 0:
        raise ValueError(f"cache_len must be >= 0, got {cache_len}")
    if cache_len > max_len:
        raise ValueError(f"cache_len ({cache_len}) must not exceed max_len ({max_len})")
    if factor < 0:
        raise ValueError(f"factor must be >= 0 (it is a penalty), got {factor}")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.float64
    length = lengths.to(torch.float64)  # [...]
    safe_len = max_len - cache_len
    # max(cache_len, 1) only guards the division; with cache_len == 0 no length falls in the soft zone.
    soft = factor * (safe_len - length) / max(cache_len, 1)  # [...]
    penalty = torch.where(length <= safe_len, torch.zeros_like(length), soft)  # [...]
    penalty = torch.where(length > max_len, torch.full_like(length, -factor), penalty)  # [...]
    return penalty.to(dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate of ``KL(pi || pi_ref)`` from the sampled tokens' log-probs (Schulman, 2020).

    - ``"k1"``: ``logprobs - ref_logprobs`` (unbiased, can be negative).
    - ``"k3"``: ``exp(d) - d - 1`` with ``d = ref_logprobs - logprobs`` (unbiased, never negative; the
      GRPO paper's choice); computed as ``expm1(d) - d`` to keep precision for small ``d``.

    DAPO itself uses no KL term; reduce the result with :func:`aggregate` and scale by ``beta``.

    Shapes:
        logprobs, ref_logprobs: ``[B, T]``; returns ``[B, T]``.

    Raises:
        ValueError: unknown ``kind`` or mismatched shapes.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KL_KINDS))}; got {kind!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have equal shapes, got {tuple(logprobs.shape)} "
            f"and {tuple(ref_logprobs.shape)}"
        )
    if kind == "k1":
        return logprobs - ref_logprobs  # [B, T]
    diff = ref_logprobs - logprobs  # [B, T]
    return torch.expm1(diff) - diff  # [B, T]


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position, ``-sum_v p_v log p_v``.

    Computed from ``log_softmax`` (logsumexp-based, no overflow for large logits). Entries with a
    ``-inf`` logit (masked vocabulary) have ``p = 0`` and contribute exactly 0, with a finite gradient;
    a naive ``p * log p`` would give ``0 * -inf = nan`` there.

    Shapes:
        logits: ``[B, T, V]``; returns ``[B, T]``.
    """
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    finite_logp = torch.where(torch.isneginf(logits), torch.zeros_like(logp), logp)  # [B, T, V]
    return -(logp.exp() * finite_logp).sum(dim=-1)  # [B, T]


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    ``logit[token] - logsumexp(logits)``: no ``[B, T, V]`` log-softmax is materialised. Use the rollout's
    sampling temperature so the trainer's log-probs are those of the distribution that was sampled.
    Precision follows ``logits``' dtype; pass float32 logits (bf16 log-probs are too coarse for ratios).

    Shapes:
        logits: ``[B, T, V]``; tokens: ``[B, T]`` integer ids; returns ``[B, T]``.

    Raises:
        ValueError: ``temperature <= 0`` or ``tokens.shape != logits.shape[:-1]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}"
        )
    if temperature != 1.0:
        logits = logits / temperature  # [B, T, V]
    picked = torch.gather(logits, dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)  # [B, T]


# ---------------------------------------------------------------------------------------------------------
# Rollout correction: the engine/trainer mismatch (TIS and MIS / IcePop). See docs/rollout-correction.md.
# ---------------------------------------------------------------------------------------------------------

CORRECTION_MODES = ("off", "tis", "mis", "both")
CORRECTION_LEVELS = ("token", "sequence")
# Bound of the log-ratio in the *metrics* only (the weights never need it): exp(20) ~ 4.9e8, so the sums of
# squared sequence weights stay finite in float64 for any batch. verl bounds its ratios the same way.
METRIC_LOG_RATIO_BOUND = 20.0
# Keys of :func:`rollout_correction_sums`; ``CORRECTION_MAX_KEYS`` are maxima (reduced with max), the others sums.
CORRECTION_SUM_KEYS = (
    "units",
    "ratio_sum",
    "ratio_max",
    "truncated",
    "masked",
    "seqs",
    "seq_w_sum",
    "seq_w_sq_sum",
)
CORRECTION_MAX_KEYS = ("ratio_max",)


def check_correction_args(mode: str, level: str, clip: float, low: float, high: float) -> None:
    """Raise a ``ValueError`` naming the bad rollout-correction argument (shared with the module's config)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, CORRECTION_MODES))}; got {mode!r}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, CORRECTION_LEVELS))}; got {level!r}")
    if not clip >= 1:
        raise ValueError(
            f"clip must be >= 1 (TIS truncates the ratio at clip; below 1 it would shrink the gradient of "
            f"tokens the engine and the trainer agree on), got {clip}"
        )
    if not 0 <= low <= 1 <= high:
        raise ValueError(
            f"MIS bounds must satisfy 0 <= low <= 1 <= high (a ratio of 1, engine and trainer agreeing, is "
            f"always kept), got low={low}, high={high}"
        )
    if low == high:
        raise ValueError(f"MIS bounds low and high must differ, got low = high = {low}")


def rollout_log_ratio(old_logprobs: Tensor, engine_logprobs: Tensor, engine_mask: Tensor) -> Tensor:
    """Per-token log of the rollout ratio ``pi_old_trainer / pi_engine``; 0 (a ratio of 1) where there is none.

    ``engine_mask`` is 1 on response tokens whose engine log-prob is known: 0 on padding and prompt tokens and on
    whole rows of carried-over groups (sampled one update earlier, their engine log-probs are dropped, see
    :func:`dapo_pl.datamodule.build_rollout_batch`). Those get a log-ratio of 0, so no correction touches them.
    Hand-worked: ``old = [-1.0, -2.0]``, ``engine = [-1.5, -1.0]``, mask ``[1, 1]`` -> ``[0.5, -1.0]``,
    ratios ``[e^0.5, e^-1] = [1.6487, 0.3679]``.

    Shapes:
        old_logprobs, engine_logprobs, engine_mask: ``[B, T]``; returns ``[B, T]``, detached.
    """
    if old_logprobs.shape != engine_logprobs.shape or old_logprobs.shape != engine_mask.shape:
        raise ValueError(
            "old_logprobs, engine_logprobs and engine_mask must have equal shapes, got "
            f"{tuple(old_logprobs.shape)}, {tuple(engine_logprobs.shape)}, {tuple(engine_mask.shape)}"
        )
    diff = (old_logprobs - engine_logprobs).detach()  # [B, T]
    return torch.where(engine_mask != 0, diff, torch.zeros_like(diff))  # [B, T]


def _level_log_ratio(log_ratio: Tensor, level: str) -> Tensor:
    """Token level: the log-ratio itself; sequence level: each row's sum (log of the product), on every token."""
    if level == "token":
        return log_ratio  # [B, T]
    return log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # [B, T]


def tis_weights(log_ratio: Tensor, engine_mask: Tensor, *, level: str = "token", clip: float = 2.0) -> Tensor:
    """Truncated importance-sampling weights ``min(rho, clip)`` of each token's policy-gradient term.

    - ``level="token"``: ``rho_t = pi_old_trainer(y_t) / pi_engine(y_t)``, per token (verl ``rollout_is: token``,
      TRL ``token_truncate``).
    - ``level="sequence"``: ``rho = prod_t rho_t = exp(sum_t log rho_t)`` over the response's tokens, the
      standard sequence-level importance weight of the whole response (verl ``rollout_is: sequence``, TRL
      ``sequence_truncate``; *not* the geometric mean, which verl uses only for rejection), on every token.

    Computed as ``min(exp(log rho), clip)``: exactly ``clip`` when truncated (in any dtype), and a product that
    overflows to ``inf`` on a long response becomes ``clip`` too, never ``nan``. Tokens without an
    engine log-prob (``engine_mask == 0``: padding, carried-over rows) get weight 1. The weights carry no
    gradient: they multiply the loss like the advantage does. Hand-worked, ``clip = 2``: log-ratios
    ``[0.5, -1.0, 1.0]`` of one row give token weights ``[1.6487, 0.3679, 2]`` (``e^1 = 2.718`` truncated) and the
    sequence weight ``min(e^0.5, 2) = 1.6487`` on all three.

    Shapes:
        log_ratio: ``[B, T]`` from :func:`rollout_log_ratio`; engine_mask: ``[B, T]``; returns ``[B, T]``.
    """
    check_correction_args("tis", level, clip, 0.0, 1.0)
    unit = _level_log_ratio(log_ratio.detach(), level)  # [B, T]
    weights = torch.exp(unit).clamp(max=clip)  # [B, T]
    return torch.where(engine_mask != 0, weights, torch.ones_like(weights))  # [B, T]


def mis_keep_mask(
    log_ratio: Tensor, engine_mask: Tensor, *, level: str = "token", low: float = 0.5, high: float = 2.0
) -> Tensor:
    """Masked importance sampling (MIS; IcePop at token level): keep a token only if its ratio is in ``[low, high]``.

    The ratio is ``rho_t`` (token level) or the sequence's ``prod_t rho_t`` (sequence level: the whole response
    is kept or dropped), as in :func:`tis_weights`. Multiply the loss mask by the result *before* the token-mean
    denominator is counted, so the dropped tokens leave it like any other masked token. Tokens without an engine
    log-prob are kept (there is nothing to compare). Hand-worked, ``[low, high] = [0.5, 2]``: log-ratios
    ``[0.5, -1.0, 1.0]`` keep ``[True, False, False]`` (``e^-1 = 0.37 < 0.5``, ``e^1 = 2.7 > 2``) at token level and
    all three at sequence level (``e^0.5 = 1.65``).

    Shapes:
        log_ratio, engine_mask: ``[B, T]``; returns ``[B, T]`` bool.
    """
    check_correction_args("mis", level, 1.0, low, high)
    ratio = torch.exp(_level_log_ratio(log_ratio.detach(), level))  # [B, T]; an overflow (inf) is > high
    inside = (ratio >= low) & (ratio <= high)  # [B, T]
    return inside | (engine_mask == 0)  # [B, T]


def rollout_correction(
    old_logprobs: Tensor,
    engine_logprobs: Tensor,
    engine_mask: Tensor,
    loss_mask: Tensor,
    *,
    mode: str,
    level: str = "token",
    clip: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """The rollout correction of one micro-batch: TIS weights and the MIS-corrected loss mask.

    ``mode``: ``"off"`` (weights 1, mask unchanged), ``"tis"`` (:func:`tis_weights`), ``"mis"``
    (:func:`mis_keep_mask`) or ``"both"`` (masked tokens dropped, the kept ones weighted). Pass the weights to
    :func:`policy_loss` (``is_weights=``) and use the returned mask for everything downstream: the loss, the KL
    term and :func:`token_mean_denominator`. Every quantity is per row, so the result does not depend on how
    the rows are split into micro-batches or ranks.

    Shapes:
        old_logprobs, engine_logprobs, engine_mask, loss_mask: ``[B, T]``.
        returns: ``(is_weights [B, T], loss_mask [B, T])``, both detached; the mask keeps ``loss_mask``'s dtype.
    """
    check_correction_args(mode, level, clip, low, high)
    log_ratio = rollout_log_ratio(old_logprobs, engine_logprobs, engine_mask)  # [B, T]
    weights = torch.ones_like(log_ratio)  # [B, T]
    if mode in ("tis", "both"):
        weights = tis_weights(log_ratio, engine_mask, level=level, clip=clip)  # [B, T]
    if mode in ("mis", "both"):
        keep = mis_keep_mask(log_ratio, engine_mask, level=level, low=low, high=high)  # [B, T]
        loss_mask = torch.where(keep, loss_mask, torch.zeros_like(loss_mask))  # [B, T]
    return weights, loss_mask


@torch.no_grad()
def rollout_correction_sums(
    old_logprobs: Tensor,
    engine_logprobs: Tensor,
    engine_mask: Tensor,
    loss_mask: Tensor,
    *,
    mode: str,
    level: str = "token",
    clip: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> dict[str, float]:
    """Additive pieces (and one maximum) of the rollout-correction metrics of one micro-batch.

    Counted over *units*: tokens with an engine log-prob and a loss weight at token level, responses with at
    least one such token at sequence level; ``loss_mask`` is the mask *before* MIS. Ratios are bounded to
    ``exp(+-METRIC_LOG_RATIO_BOUND)`` here only. Add the sums over micro-batches and ranks and take the max of
    :data:`CORRECTION_MAX_KEYS` (:func:`combine_correction_sums`), then :func:`rollout_correction_metrics`.
    Keys: ``units``, ``ratio_sum``, ``ratio_max``, ``truncated`` (units with ``rho > clip`` when TIS is on),
    ``masked`` (units outside ``[low, high]`` when MIS is on), ``seqs``, ``seq_w_sum``, ``seq_w_sq_sum`` (the
    sequence weights ``prod_t rho_t`` of every response, at any level, for the effective sample size).

    Shapes:
        old_logprobs, engine_logprobs, engine_mask, loss_mask: ``[B, T]``; returns floats.
    """
    check_correction_args(mode, level, clip, low, high)
    active = (engine_mask != 0) & (loss_mask != 0)  # [B, T]
    log_ratio = rollout_log_ratio(old_logprobs, engine_logprobs, active).double()  # [B, T]
    seq_log = log_ratio.sum(dim=1)[active.any(dim=1)]  # [S]
    unit_log = log_ratio[active] if level == "token" else seq_log  # [N]: tokens, or S responses
    # The decisions use the unbounded ratio and the same comparisons as tis_weights / mis_keep_mask.
    exact = unit_log.exp()  # [N]
    no = torch.zeros_like(exact, dtype=torch.bool)  # [N]
    truncated = exact > clip if mode in ("tis", "both") else no  # [N]
    masked = ~((exact >= low) & (exact <= high)) if mode in ("mis", "both") else no  # [N]
    bound = METRIC_LOG_RATIO_BOUND
    unit_ratio = unit_log.clamp(-bound, bound).exp()  # [N]
    seq_ratio = seq_log.clamp(-bound, bound).exp()  # [S]
    values = [
        torch.tensor(float(unit_ratio.numel()), dtype=torch.float64, device=unit_ratio.device),
        unit_ratio.sum(),
        unit_ratio.max() if unit_ratio.numel() else unit_ratio.new_zeros(()),
        truncated.sum().double(),
        masked.sum().double(),
        torch.tensor(float(seq_ratio.numel()), dtype=torch.float64, device=unit_ratio.device),
        seq_ratio.sum(),
        (seq_ratio**2).sum(),
    ]
    return dict(zip(CORRECTION_SUM_KEYS, torch.stack(values).tolist(), strict=True))  # one device sync


def combine_correction_sums(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Merge :func:`rollout_correction_sums` of several micro-batches: sums add, maxima take the max."""
    if not parts:
        raise ValueError("parts must hold at least one dict of rollout_correction_sums")
    return {
        key: max(p[key] for p in parts) if key in CORRECTION_MAX_KEYS else sum(p[key] for p in parts)
        for key in parts[0]
    }


def rollout_correction_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``rollout/*`` metrics from :func:`rollout_correction_sums` reduced over micro-batches and ranks.

    - ``rollout/is_ratio_mean``, ``rollout/is_ratio_max``: the raw (untruncated) ratio of the units.
    - ``rollout/is_truncated_frac``: share of units whose TIS weight was truncated at ``clip``.
    - ``rollout/masked_frac``: share of units MIS dropped from the loss (and from the denominator).
    - ``rollout/ess``: normalised effective sample size of the sequence weights ``w_i = prod_t rho_t``,
      ``(sum_i w_i)^2 / (N sum_i w_i^2)``, in ``(0, 1]``; 1 when engine and trainer agree.
    Hand-worked: sequence weights ``[1, 1, 4]`` give ``36 / (3 * 18) = 0.667``. Empty (no engine log-prob
    anywhere, e.g. a step of carried-over groups only): no metric at all, rather than a misleading 0.
    """
    if sums["units"] == 0:
        return {}
    units = sums["units"]
    return {
        "rollout/is_ratio_mean": sums["ratio_sum"] / units,
        "rollout/is_ratio_max": sums["ratio_max"],
        "rollout/is_truncated_frac": sums["truncated"] / units,
        "rollout/masked_frac": sums["masked"] / units,
        "rollout/ess": sums["seq_w_sum"] ** 2 / (sums["seqs"] * sums["seq_w_sq_sum"]),
    }

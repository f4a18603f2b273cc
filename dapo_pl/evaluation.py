"""Evaluation statistics of n sampled responses per prompt: avg@n, unbiased pass@k, maj@k, bootstrap intervals.

Given, for P prompts, n samples each with a correctness flag and the verifier's ``extracted`` answer:

- **avg@n**: mean correctness over the P x n samples (the paper's AIME number is avg@32).
- **pass@k** for any k <= n: Chen et al. (2021)'s unbiased estimator, per prompt ``1 - C(n-c, k) / C(n, k)`` with c
  right samples, then the mean over prompts: the chance that at least one of k samples drawn without replacement
  from the n is right. With k = n it is "any sample right".
- **maj@k** for any k <= n: the chance that a majority vote over k samples drawn without replacement from the n
  picks a right answer, computed exactly (no subset enumeration; :func:`maj_at_k`). Votes: every right sample votes
  for the reference (the verifier judged it equivalent to it, so its equivalence is used where it offers one); a
  wrong sample votes for its extracted answer, whitespace-normalised; a sample without an extracted answer does
  not vote. A vote without any answer counts as wrong. Ties between answers are broken deterministically, in
  favour of the answer first given among the n samples (so a tie between right and wrong is not always right).
- **Bootstrap intervals**: percentile intervals of each metric's mean over prompts, from B resamples of the
  prompts with replacement, drawn with a fixed seed (the same resamples for every metric), so the same samples
  give the same interval.

Metric names (logged at validation, printed by ``dapo-pl validate``): ``val/acc_avg_at_{n}``, ``val/pass_at_{k}``,
``val/maj_at_{k}``, each with ``_ci_low`` and ``_ci_high``. Everything is a pure function of per-prompt data, so
data-parallel ranks gather the per-prompt rows (:func:`vote_matrix`) and every rank computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NO_VOTE = -1  # a sample without an extracted answer
RIGHT = 0  # the class of every right sample (the reference answer)


@dataclass(frozen=True)
class EvalStatsConfig:
    """Which statistics validation reports besides avg@n and pass@n (n = ``data.val_rollout.n``).

    Attributes:
        k: the k of pass@k and maj@k (each <= n); n itself is always reported.
        bootstrap: bootstrap resamples of the prompts for the intervals (0: no intervals).
        confidence: coverage of the intervals.
        seed: seed of the bootstrap resampling (fixed, so an interval is a function of the samples).
    """

    k: tuple[int, ...] = (1,)
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.k):
            raise ValueError(f"data.val_stats.k values must be >= 1, got {list(self.k)}")
        if self.bootstrap < 0:
            raise ValueError(f"data.val_stats.bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"data.val_stats.confidence must be in (0, 1), got {self.confidence}")

    def ks(self, n: int) -> list[int]:
        """The sorted k values for n samples per prompt (n included); a k above n fails, naming both."""
        if bad := [k for k in self.k if k > n]:
            raise ValueError(
                f"data.val_stats.k has {bad}, more than the {n} samples per prompt (data.val_rollout.n): "
                "pass@k and maj@k need n >= k samples"
            )
        return sorted({*self.k, n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``, exact in integers then rounded once.

    Hand-worked: ``pass_at_k(4, 1, 2) = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5``; ``pass_at_k(5, 0, 3) = 0``;
    ``pass_at_k(5, 3, 3) = 1`` (fewer than 3 wrong samples: every 3-subset holds a right one).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote_labels(correct: Sequence[bool], extracted: Sequence[str | None]) -> list[int]:
    """Each sample's vote: :data:`RIGHT` for right samples, :data:`NO_VOTE` without an answer, else 1, 2, ...
    per distinct (whitespace-normalised) wrong answer in order of first appearance.

    E.g. ``vote_labels([False, True, False, False], ["7", "8", None, " 7"]) == [1, 0, -1, 1]``.
    """
    classes: dict[str, int] = {}
    labels = []
    for ok, answer in zip(correct, extracted, strict=True):
        if ok:
            labels.append(RIGHT)
        elif answer is None or not answer.strip():
            labels.append(NO_VOTE)
        else:
            labels.append(classes.setdefault(" ".join(answer.split()), len(classes) + 1))
    return labels


def _tie_order(labels: Sequence[int]) -> dict[int, int]:
    """Rank of each voting class in tie-breaks: the order of its first sample among the n."""
    order: dict[int, int] = {}
    for label in labels:
        if label != NO_VOTE:
            order.setdefault(label, len(order))
    return order


def _ways(sizes: Sequence[int], caps: Sequence[int], total: int) -> int:
    """Ways to pick ``total`` items from groups of ``sizes`` taking at most ``caps[j]`` from group j:
    the coefficient of ``x**total`` in ``prod_j sum_{m <= caps[j]} C(sizes[j], m) x**m`` (exact integers)."""
    poly = [1]
    for size, cap in zip(sizes, caps, strict=True):
        terms = [math.comb(size, m) for m in range(min(size, cap, total) + 1)]
        new = [0] * min(len(poly) + len(terms) - 1, total + 1)
        for i, a in enumerate(poly):
            for m, b in enumerate(terms[: total + 1 - i]):
                new[i + m] += a * b
        poly = new
    return poly[total] if total < len(poly) else 0


def maj_at_k(labels: Sequence[int], k: int) -> float:
    """The probability that a majority vote over ``k`` of the n samples (a uniform k-subset) is right.

    The right class (:data:`RIGHT`) wins a subset holding ``t >= 1`` of its samples when every other voting class
    holds fewer than t, or exactly t but comes later in the tie order (:func:`_tie_order`); non-voters are free.
    So ``P = sum_t C(n_right, t) * ways(others within those caps, k - t) / C(n, k)``, exact.
    Hand-worked, labels ``[0, 1, 1, -1]`` (one right, two of one wrong answer, one without), k = 2: of the 6 pairs,
    {0,1} and {0,2} tie 1-1 and the right answer comes first, {0,3} has only the right vote: 3/6 = 0.5.
    """
    n = len(labels)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    right = counts.pop(RIGHT, 0)
    free = counts.pop(NO_VOTE, 0)
    order = _tie_order(labels)
    others = sorted(counts)
    wins = 0
    for t in range(1, min(right, k) + 1):
        # A wrong class that comes before the right one in the tie order must stay below t; after it, at most t.
        caps = [t - 1 if order[c] < order.get(RIGHT, n) else t for c in others] + [free]
        wins += math.comb(right, t) * _ways([counts[c] for c in others] + [free], caps, k - t)
    return wins / math.comb(n, k)


def vote_matrix(correct: Tensor, extracted: Sequence[Sequence[str | None]]) -> Tensor:
    """Per-prompt vote labels ``[P, n]`` (int64) of a correctness matrix and its extracted answers.

    Shapes:
        correct: ``[P, n]`` bool; extracted: P lists of n answers (None: none extracted).
        returns: ``[P, n]`` int64, :func:`vote_labels` of each row (right samples are exactly the 0 labels).
    """
    rows = [vote_labels(c, e) for c, e in zip(correct.tolist(), extracted, strict=True)]
    return torch.tensor(rows, dtype=torch.long).reshape(correct.shape)


def per_prompt_metrics(votes: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Each prompt's avg@n, pass@k and maj@k, named without the ``val/`` prefix.

    Shapes:
        votes: ``[P, n]`` int64 labels (:func:`vote_matrix`).
        returns: name -> ``[P]`` float64.
    """
    n = votes.shape[1]
    right = (votes == RIGHT).sum(dim=1).tolist()  # [P]
    labels = votes.tolist()
    out = {f"acc_avg_at_{n}": torch.tensor([c / n for c in right], dtype=torch.float64)}
    for k in ks:
        out[f"pass_at_{k}"] = torch.tensor([pass_at_k(n, c, k) for c in right], dtype=torch.float64)
    for k in ks:
        out[f"maj_at_{k}"] = torch.tensor([maj_at_k(row, k) for row in labels], dtype=torch.float64)
    return out


def bootstrap_interval(
    values: Tensor, *, resamples: int, confidence: float = 0.95, seed: int = 0, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of the mean over prompts, for several metrics at once.

    Resample b draws P prompt indices with replacement (``torch.Generator`` seeded with ``seed``; the same draws
    for every column); the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles
    (linear interpolation) of the B resampled means.

    Shapes:
        values: ``[P, M]`` float64, one column per metric.
        returns: (low ``[M]``, high ``[M]``).
    """
    num_prompts = values.shape[0]
    if num_prompts == 0 or resamples < 1:
        nan = torch.full((values.shape[1],), float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    gen = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = torch.randint(num_prompts, (size, num_prompts), generator=gen)  # [b, P]
        means.append(values[idx].mean(dim=1))  # [b, M]
    stacked = torch.cat(means)  # [B, M]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    low, high = torch.quantile(stacked, q, dim=0)  # [M] each
    return low, high


def evaluation_metrics(votes: Tensor, cfg: EvalStatsConfig = EvalStatsConfig()) -> dict[str, float]:
    """``val/`` metrics of per-prompt vote labels: means, and bootstrap intervals when ``cfg.bootstrap > 0``.

    Shapes:
        votes: ``[P, n]`` int64 (:func:`vote_matrix`); P may be 0 (then every value is NaN).
    """
    per_prompt = per_prompt_metrics(votes, cfg.ks(votes.shape[1]))
    names = list(per_prompt)
    values = torch.stack([per_prompt[m] for m in names], dim=1)  # [P, M]
    means = values.mean(dim=0) if values.shape[0] else torch.full((len(names),), float("nan"))  # [M]
    metrics = {f"val/{m}": float(v) for m, v in zip(names, means, strict=True)}
    if cfg.bootstrap > 0:
        low, high = bootstrap_interval(
            values, resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed
        )
        for m, lo, hi in zip(names, low.tolist(), high.tolist(), strict=True):
            metrics[f"val/{m}_ci_low"], metrics[f"val/{m}_ci_high"] = lo, hi
    return metrics


def summary_line(metrics: dict[str, float]) -> str:
    """``avg@4 0.312 [0.27, 0.36], pass@1 ...``: each metric with its interval, for the console."""
    parts = []
    for name, value in metrics.items():
        if name.endswith(("_ci_low", "_ci_high")):
            continue
        short = name.removeprefix("val/").replace("acc_avg_at_", "avg@").replace("pass_at_", "pass@")
        short = short.replace("maj_at_", "maj@")
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        parts.append(f"{short} {value:.3f}{ci}")
    return ", ".join(parts)


def gather_prompt_rows(rows: Tensor, dp: Any) -> Tensor:
    """Every rank's per-prompt rows, in the order of the whole validation set, on every rank.

    Validation prompts are sharded round-robin (:func:`dapo_pl.distributed.shard`: rank r holds prompts r,
    r + size, ...), so local row i is global row ``i * size + rank``; each rank writes its rows there in a zero
    matrix and a sum over ranks fills it. One rank and two ranks thus see the same matrix (and the same bootstrap
    intervals). ``dp`` is a :class:`dapo_pl.distributed.DataParallel`.

    Shapes:
        rows: ``[P_rank, n]`` int64. returns: ``[P, n]`` int64, P the sum over ranks.
    """
    if not dp.distributed:
        return rows
    n = rows.shape[1]
    counts = [int(c) for c in dp.sum([rows.shape[0] if r == dp.rank else 0 for r in range(dp.size)])]
    total = sum(counts)
    # Shift by 2 so that 0 means "not this rank's row" (labels start at -1).
    full = torch.zeros(total, n, dtype=torch.float64)  # [P, n]
    full[dp.rank : dp.rank + rows.shape[0] * dp.size : dp.size] = rows.double() + 2
    summed = torch.tensor(dp.sum(full.flatten().tolist()), dtype=torch.float64).reshape(total, n)  # [P, n]
    return summed.long() - 2

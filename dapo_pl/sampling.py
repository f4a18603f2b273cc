"""Dynamic sampling and overlong filtering: the data-side DAPO techniques, one small function each.

- :func:`group_keep_mask`: keep a group only if its answers are not all right or all wrong (DAPO Eq. 11's
  constraint ``0 < |{correct}| < G``). It filters on *correctness*, not on the shaped reward, and treats
  ``std <= 1e-6`` as zero variance (DESIGN.md, "Decisions").
- :class:`GroupBuffer`: kept groups waiting to be trained on; surplus groups carry over to the next step
  instead of being thrown away (a departure from the paper's reference code, which drops them).
- :func:`fill_batch`: the bounded refill loop: generate, score, filter until ``num_groups`` groups are kept
  or ``max_num_gen_batches`` generation batches were spent. With several data-parallel ranks the ranks agree
  after every generation batch, so all of them run the same number of generation batches.
- :func:`overlong_filter_mask`: overlong filtering, masking the loss of truncated responses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor

ZERO_VARIANCE_STD = 1e-6

G_ = TypeVar("G_")


def group_keep_mask(correct: Tensor, eps: float = ZERO_VARIANCE_STD) -> Tensor:
    """Which groups carry a learning signal: those whose correctness varies within the group.

    Shapes:
        correct: ``[num_groups, G]`` (bool or 0/1) -> ``[num_groups]`` bool.

    A group of size 1 never varies, so it is always dropped; callers reject ``G == 1`` with dynamic sampling on
    before generating anything. Example: ``[[1, 0], [1, 1], [0, 0]] -> [True, False, False]``.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [num_groups, G], got shape {tuple(correct.shape)}")
    if correct.shape[1] < 2:
        return torch.zeros(correct.shape[0], dtype=torch.bool)
    std = correct.double().std(dim=1)  # [num_groups], unbiased
    return std > eps


def overlong_filter_mask(truncated: Tensor) -> Tensor:
    """Per-sequence loss weight for overlong filtering: 0 for responses cut at the length cap, else 1.

    Shapes:
        truncated: ``[B]`` bool -> ``[B]`` float. Multiplied into the ``[B, T]`` loss mask, it removes the
        truncated responses' tokens from the loss *and* from the token-mean denominator.
    """
    return (~truncated.bool()).float()


class GroupBuffer(Generic[G_]):
    """First-in first-out store of kept groups; what a step does not use waits for the next step."""

    def __init__(self) -> None:
        self._groups: list[G_] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: Iterable[G_]) -> None:
        self._groups.extend(groups)

    def take(self, n: int) -> list[G_]:
        """Up to ``n`` groups, oldest first; the rest stay (carry-over)."""
        taken, self._groups = self._groups[:n], self._groups[n:]
        return taken

    def state(self) -> list[G_]:
        return list(self._groups)


class DynamicSamplingExhausted(RuntimeError):
    """``max_num_gen_batches`` generation batches did not yield enough groups with mixed answers."""


@dataclass(frozen=True)
class FillStats:
    """What one refill loop did: generation batches spent, groups generated, groups kept (with filtering)."""

    num_gen_batches: int
    groups_generated: int
    groups_kept: int
    exhausted: bool

    @property
    def kept_group_frac(self) -> float:
        return self.groups_kept / self.groups_generated if self.groups_generated else 0.0


def fill_batch(
    buffer: GroupBuffer[G_],
    num_groups: int,
    generate: Callable[[], list[G_]],
    keep: Callable[[list[G_]], list[bool]],
    *,
    max_num_gen_batches: int,
    on_exhausted: Literal["train", "raise"] = "train",
    all_done: Callable[[bool], bool] | None = None,
) -> tuple[list[G_], FillStats]:
    """Generate until ``buffer`` holds ``num_groups`` kept groups, then take them.

    ``generate()`` returns one generation batch of groups; ``keep(groups)`` says which carry signal (for
    dynamic sampling off, it returns all True). At most ``max_num_gen_batches`` generations run (``0`` means
    unbounded); when that bound is hit with too few groups, ``on_exhausted="train"`` returns the groups there are
    (possibly none) and ``"raise"`` raises :class:`DynamicSamplingExhausted`. Either way ``FillStats.exhausted``
    reports it so the caller can log it. Surplus kept groups stay in ``buffer`` for the next call.

    Data-parallel ranks (each filling its own ``buffer`` with its own share ``num_groups``) pass ``all_done``:
    it takes this rank's "I have my groups" and returns whether *every* rank has them (an all-reduce). A rank
    that is full keeps generating while another is short (its surplus carries over), so every rank runs the
    same number of generation batches: engines with collectives inside (tensor-parallel vLLM, weight gathers
    under FSDP) need that, and it makes ``exhausted`` one decision for all ranks (``raise`` raises on every
    rank; with ``train`` a short rank returns fewer groups than the others, possibly none).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    agree = all_done or (lambda done: done)
    spent = generated = kept = 0
    done = agree(len(buffer) >= num_groups)
    while not done and (max_num_gen_batches == 0 or spent < max_num_gen_batches):
        groups = generate()
        flags = keep(groups)
        spent += 1
        generated += len(groups)
        kept += sum(flags)
        buffer.add(g for g, f in zip(groups, flags, strict=True) if f)
        done = agree(len(buffer) >= num_groups)
    exhausted = not done
    if exhausted and on_exhausted == "raise":
        elsewhere = (
            " (this rank had enough; another data-parallel rank did not)" if len(buffer) >= num_groups else ""
        )
        raise DynamicSamplingExhausted(
            f"dynamic sampling kept {len(buffer)} of the {num_groups} groups a step needs{elsewhere} after "
            f"{spent} generation batches (max_num_gen_batches={max_num_gen_batches}); {generated} groups were "
            "generated and all others had identical correctness. Raise max_num_gen_batches, use easier/harder "
            "prompts, or set on_exhausted: train."
        )
    return buffer.take(num_groups), FillStats(spent, generated, kept, exhausted)

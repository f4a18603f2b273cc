"""Dynamic sampling and overlong filtering edge cases (DAPO Sec. 3.2, 3.4)."""

from __future__ import annotations

import pytest
import torch

from dapo_pl.sampling import (
    DynamicSamplingExhausted,
    GroupBuffer,
    fill_batch,
    group_keep_mask,
    overlong_filter_mask,
)


def test_keep_mask_drops_all_right_and_all_wrong_groups() -> None:
    correct = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert group_keep_mask(correct).tolist() == [True, False, False, True]


def test_keep_mask_every_group_filtered() -> None:
    correct = torch.tensor([[True, True], [False, False]])
    assert group_keep_mask(correct).tolist() == [False, False]


def test_keep_mask_group_size_one_never_kept() -> None:
    assert group_keep_mask(torch.tensor([[True], [False]])).tolist() == [False, False]


def test_keep_mask_ties_in_float_correctness_are_zero_variance() -> None:
    """Correctness given as floats: equal values (a tie) have std exactly 0 <= 1e-6 and are dropped."""
    correct = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
    assert group_keep_mask(correct).tolist() == [False, True]


def test_keep_mask_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\[num_groups, G\]"):
        group_keep_mask(torch.tensor([True, False]))


def test_overlong_filter_mask() -> None:
    assert overlong_filter_mask(torch.tensor([True, False, True])).tolist() == [0.0, 1.0, 0.0]


def _scripted(batches: list[list[str]]):  # type: ignore[no-untyped-def]
    """A generate() returning the given generation batches in turn; groups are strings ending in a keep flag."""
    it = iter(batches)
    calls = []

    def generate() -> list[str]:
        calls.append(1)
        return next(it)

    return generate, calls


def _keep(groups: list[str]) -> list[bool]:
    return [g.endswith("+") for g in groups]


def test_fill_batch_refills_until_full_and_carries_surplus_over() -> None:
    buffer: GroupBuffer[str] = GroupBuffer()
    generate, calls = _scripted([["a+", "b-", "c-"], ["d+", "e+", "f+"], ["g+", "h+", "i+"]])
    groups, stats = fill_batch(buffer, 3, generate, _keep, max_num_gen_batches=5)
    assert groups == ["a+", "d+", "e+"]
    assert (stats.num_gen_batches, stats.groups_generated, stats.groups_kept, stats.exhausted) == (
        2,
        6,
        4,
        False,
    )
    assert stats.kept_group_frac == pytest.approx(4 / 6, abs=1e-12)
    assert buffer.state() == ["f+"]  # surplus carried over, oldest first next time
    groups, stats = fill_batch(buffer, 3, generate, _keep, max_num_gen_batches=5)
    assert groups == ["f+", "g+", "h+"] and stats.num_gen_batches == 1 and buffer.state() == ["i+"]
    assert len(calls) == 3


def test_fill_batch_exhausted_trains_on_what_it_has() -> None:
    buffer: GroupBuffer[str] = GroupBuffer()
    generate, calls = _scripted([["a+", "b-"], ["c-", "d-"], ["e+", "f+"]])
    groups, stats = fill_batch(buffer, 4, generate, _keep, max_num_gen_batches=2, on_exhausted="train")
    assert groups == ["a+"] and stats.exhausted and stats.num_gen_batches == 2 and len(calls) == 2


def test_fill_batch_every_group_filtered_returns_nothing() -> None:
    buffer: GroupBuffer[str] = GroupBuffer()
    generate, _ = _scripted([["a-", "b-"], ["c-", "d-"]])
    groups, stats = fill_batch(buffer, 2, generate, _keep, max_num_gen_batches=2)
    assert groups == [] and stats.exhausted and stats.groups_kept == 0 and stats.kept_group_frac == 0.0


def test_fill_batch_exhausted_raises_by_config() -> None:
    buffer: GroupBuffer[str] = GroupBuffer()
    generate, _ = _scripted([["a+", "b-"], ["c-", "d-"]])
    with pytest.raises(DynamicSamplingExhausted, match=r"kept 1 of the 4 groups.*after 2 generation batches"):
        fill_batch(buffer, 4, generate, _keep, max_num_gen_batches=2, on_exhausted="raise")


def test_fill_batch_unbounded_when_zero() -> None:
    buffer: GroupBuffer[str] = GroupBuffer()
    generate, calls = _scripted([["a-"]] * 7 + [["b+"]])
    groups, stats = fill_batch(buffer, 1, generate, _keep, max_num_gen_batches=0)
    assert groups == ["b+"] and stats.num_gen_batches == 8 and len(calls) == 8


def test_fill_batch_rejects_empty_request() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        fill_batch(GroupBuffer(), 0, lambda: [], _keep, max_num_gen_batches=1)

"""Mini/micro-batch cutting and padding of rollout batches."""

from __future__ import annotations

import pytest
import torch

from dapo_pl.batch import RolloutBatch, collate, mini_batch_slices, split_by_token_budget


def test_token_budget_split_accounts_for_padding() -> None:
    """[3, 3, 5, 2] with budget 10: [0, 1] pads to 2 x 3 = 6; adding 2 would pad to 3 x 5 = 15 > 10."""
    assert split_by_token_budget([3, 3, 5, 2], 10) == [[0, 1], [2, 3]]
    assert split_by_token_budget([3, 3, 5, 2], 9) == [[0, 1], [2], [3]]


def test_token_budget_oversized_sequence_alone_and_errors() -> None:
    assert split_by_token_budget([50, 2, 2], 10) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="max_tokens"):
        split_by_token_budget([1], 0)


def test_mini_batch_slices() -> None:
    assert mini_batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(ValueError, match="mini_batch_size"):
        mini_batch_slices(4, 0)


def test_collate_masks_align_with_next_token_positions() -> None:
    """Sequence [p0 p1 | r0 r1]: positions 1 and 2 predict r0 and r1, so response_mask = [0, 1, 1]."""
    batch = RolloutBatch(
        sequences=[torch.tensor([5, 6, 7, 8]), torch.tensor([5, 9])],
        prompt_lengths=[2, 1],
        advantages=torch.tensor([1.0, -1.0]),
        truncated=torch.tensor([False, True]),
        rollout_logprobs=[torch.tensor([-0.5, -0.25]), None],
        temperature=1.0,
    )
    mb = collate(batch, [0, 1], pad_id=0, loss_weight=torch.tensor([1.0, 0.0]))
    assert mb.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert mb.response_mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert mb.loss_mask.tolist() == [[0, 1, 1], [0, 0, 0]]  # second response filtered by its loss weight
    assert mb.rollout_logprobs.tolist() == [[0, -0.5, -0.25], [0, 0, 0]]
    assert mb.rollout_mask.tolist() == [[0, 1, 1], [0, 0, 0]]
    assert mb.advantages.tolist() == [1.0, -1.0]

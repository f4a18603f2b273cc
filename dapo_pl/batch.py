"""The rollout batch handed from the DataModule to the LightningModule, and how it is cut for the update.

A :class:`RolloutBatch` holds variable-length sequences (prompt + response). The module cuts it into mini-batches
of ``mini_batch_size`` responses (one optimizer step each) and each mini-batch into micro-batches under a token
budget (:func:`split_by_token_budget`), then right-pads each micro-batch (:func:`collate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """One step's training data: ``B`` responses from the kept groups, group members adjacent.

    Attributes:
        sequences: ``B`` tensors ``[Lp_i + Lr_i]`` of prompt then response token ids.
        prompt_lengths: ``Lp_i`` per sequence.
        advantages: ``[B]`` group-relative advantages.
        truncated: ``[B]`` bool, response hit the length cap without EOS.
        rollout_logprobs: per sequence ``[Lr_i]`` engine log-probs, or None (engine gave none, or the group was
            carried over from an earlier step and so was sampled with older weights).
        temperature: the sampling temperature (the trainer's log-probs use the same one).
        metrics: rollout-side metrics for this step (``train/...``, ``time/...``).
        samples: one record per response generated this step (kept or filtered): ``prompt``, ``response``,
            ``reference``, ``reward``, ``correct``, ``extracted``, ``kept``; for sample tables and debugging.
    """

    sequences: list[Tensor]
    prompt_lengths: list[int]
    advantages: Tensor
    truncated: Tensor
    rollout_logprobs: list[Tensor | None]
    temperature: float
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class MicroBatch:
    """Right-padded tensors for one forward/backward pass.

    Shapes: ``input_ids``/``attention_mask`` ``[b, L]``; ``response_mask``/``loss_mask``/``old_logprobs``/
    ``rollout_logprobs``/``rollout_mask`` ``[b, L-1]`` (position t scores token t+1); ``advantages`` ``[b]``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    loss_mask: Tensor
    advantages: Tensor
    rollout_logprobs: Tensor
    rollout_mask: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None  # [b, L-1] rollout-correction (TIS) weights; None: 1

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def split_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (``count * longest``) stays within ``max_tokens``.

    A sequence longer than the budget gets a micro-batch of its own. Order is kept, so group members stay together
    where they fit. Example: lengths ``[3, 3, 5, 2]``, budget 10 -> ``[[0, 1], [2], [3]]`` (``[0,1,2]`` would pad
    to 3 x 5 = 15).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def mini_batch_slices(num_sequences: int, mini_batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``mini_batch_size`` sequences: one optimizer step each."""
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    return [
        slice(s, min(s + mini_batch_size, num_sequences)) for s in range(0, num_sequences, mini_batch_size)
    ]


def has_response(batch: RolloutBatch, index: int) -> bool:
    """Whether sequence ``index`` of ``batch`` has at least one response token."""
    return len(batch.sequences[index]) > batch.prompt_lengths[index]


def collate(batch: RolloutBatch, indices: list[int], pad_id: int, loss_weight: Tensor) -> MicroBatch:
    """Right-pad the sequences ``indices`` of ``batch`` into a :class:`MicroBatch`.

    ``loss_weight`` ``[B]`` multiplies each sequence's loss mask (overlong filtering passes 0 for truncated ones).
    """
    seqs = [batch.sequences[i] for i in indices]
    width = max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # [b, L]
    attention_mask = torch.zeros((b, width), dtype=torch.long)  # [b, L]
    response_mask = torch.zeros((b, width - 1))  # [b, L-1]
    rollout_logprobs = torch.zeros((b, width - 1))  # [b, L-1]
    rollout_mask = torch.zeros((b, width - 1))  # [b, L-1]
    for row, i in enumerate(indices):
        seq, lp = batch.sequences[i], batch.prompt_lengths[i]
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
        response_mask[row, lp - 1 : len(seq) - 1] = 1.0  # positions predicting response tokens
        engine_lp = batch.rollout_logprobs[i]
        if engine_lp is not None:
            rollout_logprobs[row, lp - 1 : len(seq) - 1] = engine_lp
            rollout_mask[row, lp - 1 : len(seq) - 1] = 1.0
    index = torch.tensor(indices)
    loss_mask = response_mask * loss_weight[index].unsqueeze(1)  # [b, L-1]
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        loss_mask=loss_mask,
        advantages=batch.advantages[index],
        rollout_logprobs=rollout_logprobs,
        rollout_mask=rollout_mask,
    )


def padding_micro_batch(pad_id: int, width: int = 2) -> MicroBatch:
    """A one-row micro-batch of ``pad_id`` tokens whose loss, response and rollout masks are all empty.

    Data-parallel ranks must run the same number of forward/backward passes per optimizer step (DDP all-reduces
    gradients in every backward; FSDP gathers weights in every forward), but dynamic sampling and token budgets
    give them different numbers of micro-batches, possibly none. A rank that is short runs these: the forward
    touches every parameter, so every gradient hook fires, and the empty masks make the loss exactly 0, so the
    update is unchanged. Its attention mask is all ones, so no attention row is fully masked (that gives NaN).

    Shapes: ``input_ids``/``attention_mask`` ``[1, width]``; the masks and log-probs ``[1, width-1]``.
    """
    if width < 2:
        raise ValueError(f"width must be >= 2 (one position to score), got {width}")
    zeros = torch.zeros((1, width - 1))  # [1, width-1]
    return MicroBatch(
        input_ids=torch.full((1, width), pad_id, dtype=torch.long),
        attention_mask=torch.ones((1, width), dtype=torch.long),
        response_mask=zeros.clone(),
        loss_mask=zeros.clone(),
        advantages=torch.zeros(1),
        rollout_logprobs=zeros.clone(),
        rollout_mask=zeros.clone(),
    )

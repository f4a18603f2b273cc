"""The rollout-engine interface shared by every engine (transformers, vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (one set for training rollouts, one for validation).

    Attributes:
        n: responses per prompt (the group size G; K for validation).
        temperature: sampling temperature (> 0). The trainer computes log-probs at the same temperature, so the
            importance ratio compares the distributions that were actually sampled from.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 disables.
        max_new_tokens: the response length cap (DAPO's L_max); hitting it without EOS marks a response truncated.
        seed: base seed; generation call i uses ``seed + i``, so a run is reproducible. None (the default):
            derived from ``seed_everything`` by the data module (see :mod:`dapo_pl.seeds`); a value set here wins.
        stop: strings that end a response (besides EOS), kept in its text and tokens; a response that stops on one
            is not truncated.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (responses per prompt) must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {list(self.stop)}")


@dataclass
class Completion:
    """One sampled response.

    ``token_ids`` include the EOS token when the model produced one (the model learns to stop);
    ``truncated`` is True when generation hit ``max_new_tokens`` without EOS or a stop string; ``logprobs`` are
    the engine's log-probabilities of ``token_ids`` at the sampling temperature (None if the engine does not
    report them).
    """

    token_ids: list[int]
    text: str
    truncated: bool
    logprobs: list[float] | None = None


class RolloutEngine(Protocol):
    """Generates responses with the trainer's current weights."""

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine generate with ``model``'s current weights; called before every rollout."""

    def generate(self, prompts: list[list[int]], params: SamplingConfig, seed: int) -> list[list[Completion]]:
        """``params.n`` completions for each prompt (token ids), in prompt order; reproducible for a seed."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""

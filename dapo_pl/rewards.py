"""Reward composition: one verifier decides correctness, others add shaping terms (e.g. ``overlong``).

The training reward of a response is the correctness verifier's reward plus every shaping verifier's reward;
correctness (for dynamic sampling and ``train/acc``) comes from the correctness verifier alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dapo_pl.verification import Sample, Verdict, VerifierError, build_verifier


@dataclass(frozen=True)
class VerifierSpec:
    """A verifier by name (see ``dapo-pl verifiers``) and the options its factory takes."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardConfig:
    """How rewards are composed.

    Attributes:
        correctness: the verifier whose verdict decides right/wrong and gives the base reward (+1/-1).
        shaping: verifiers whose rewards are added on top (e.g. ``{name: overlong, options: {cache_len: 4}}``).
    """

    correctness: VerifierSpec = field(default_factory=lambda: VerifierSpec("exact_match"))
    shaping: list[VerifierSpec] = field(default_factory=list)


@dataclass(frozen=True)
class Score:
    """The composed result for one sample: total reward, correctness, and the correctness verdict."""

    reward: float
    correct: bool
    verdict: Verdict


def total_reward(verdicts: Sequence[Verdict]) -> float:
    """One sample's reward: the correctness verdict's plus every shaping verdict's (the one place of this rule,
    shared by training and ``dapo-pl verify``)."""
    return float(sum(v.reward for v in verdicts))


class RewardFunction:
    """Scores batches of samples with the configured verifiers (built once, reused every step)."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.correctness = build_verifier(cfg.correctness.name, cfg.correctness.options)
        self.shaping = [build_verifier(s.name, s.options) for s in cfg.shaping]

    def __call__(self, samples: Sequence[Sample]) -> list[Score]:
        base = self.correctness(samples)
        if any(v.correct is None for v in base):
            raise VerifierError(
                f"the correctness verifier {self.correctness.info.name!r} returned correct=None; "
                "pure shaping verifiers (like overlong) belong under reward.shaping"
            )
        shaping = [verifier(samples) for verifier in self.shaping]
        per_sample = zip(base, *shaping, strict=True)
        return [Score(total_reward(vs), bool(vs[0].correct), vs[0]) for vs in per_sample]

    def close(self) -> None:
        for v in [self.correctness, *self.shaping]:
            close = getattr(v.fn, "close", None)
            if callable(close):
                close()

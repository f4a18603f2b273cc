"""Reward composition: one verifier decides correctness, others add shaping terms (e.g. ``overlong``).

The training reward of a response is the correctness verifier's reward plus every shaping verifier's reward;
correctness (for dynamic sampling and ``train/acc``) comes from the correctness verifier alone.

A verifier batch that fails (the plugin raises, breaks the output contract, or exceeds ``timeout_s``) does not
stop the fit: its responses count as wrong (``error_reward``, not correct) with the error recorded, and
``reward/errors`` counts them. Once more than ``max_error_frac`` of all responses scored in this process have
failed, the fit stops with :class:`VerifierError` naming the plugin (see ``docs/reliability.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dapo_pl.verification import (
    DEFAULT_TIMEOUT_S,
    CheckedVerifier,
    Sample,
    Verdict,
    VerifierError,
    build_verifier,
)


@dataclass(frozen=True)
class VerifierSpec:
    """A verifier by name (see ``dapo-pl verifiers``) and the options its factory takes."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardConfig:
    """How rewards are composed, and what a failing verifier costs.

    Attributes:
        correctness: the verifier whose verdict decides right/wrong and gives the base reward (+1/-1).
        shaping: verifiers whose rewards are added on top (e.g. ``{name: overlong, options: {cache_len: 4}}``).
        timeout_s: seconds one verifier may take for one batch (a generation batch's responses); past it the
            batch's responses count as wrong with an error. None: no limit.
        max_error_frac: stop the fit once more than this share of the responses scored so far had a failed
            verifier batch (1.0: never stop).
        error_reward: the correctness reward of a response whose correctness verifier failed (DAPO's -1 for a
            wrong answer); a failed shaping verifier adds 0.
    """

    correctness: VerifierSpec = field(default_factory=lambda: VerifierSpec("exact_match"))
    shaping: list[VerifierSpec] = field(default_factory=list)
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    max_error_frac: float = 0.1
    error_reward: float = -1.0

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(
                f"data.reward.timeout_s must be > 0 (or null for no limit), got {self.timeout_s}"
            )
        if not 0 <= self.max_error_frac <= 1:
            raise ValueError(f"data.reward.max_error_frac must be in [0, 1], got {self.max_error_frac}")


@dataclass(frozen=True)
class Score:
    """The composed result for one sample: total reward, correctness, the correctness verdict, and the error of
    any verifier that failed on it (None if all judged it)."""

    reward: float
    correct: bool
    verdict: Verdict
    error: str | None = None


def total_reward(verdicts: Sequence[Verdict]) -> float:
    """One sample's reward: the correctness verdict's plus every shaping verdict's (the one place of this rule,
    shared by training and ``dapo-pl verify``)."""
    return float(sum(v.reward for v in verdicts))


def failed_verdict(judges: bool, error_reward: float = -1.0) -> Verdict:
    """What a sample gets from a verifier whose batch failed: wrong with ``error_reward`` from the correctness
    verifier (``judges``), nothing from a shaping one. :meth:`CheckedVerifier.score` fills in ``error``."""
    return Verdict(error_reward, False, None, None) if judges else Verdict(0.0, None, None, None)


class RewardFunction:
    """Scores batches of samples with the configured verifiers (built once, reused every step).

    ``errors`` counts failed responses per verifier over this object's life; ``num_scored`` all responses.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.correctness = build_verifier(
            cfg.correctness.name, cfg.correctness.options, timeout_s=cfg.timeout_s
        )
        self.shaping = [build_verifier(s.name, s.options, timeout_s=cfg.timeout_s) for s in cfg.shaping]
        self.errors: Counter[str] = Counter()
        self.num_scored = 0
        self._reported: set[str] = set()

    def __call__(self, samples: Sequence[Sample]) -> list[Score]:
        base, base_error = self.correctness.score(samples, failed_verdict(True, self.cfg.error_reward))
        if any(v.correct is None for v in base):
            raise VerifierError(
                f"the correctness verifier {self.correctness.info.name!r} returned correct=None; "
                "pure shaping verifiers (like overlong) belong under reward.shaping"
            )
        shaped = [v.score(samples, failed_verdict(False)) for v in self.shaping]
        errors = [base_error, *(e for _, e in shaped)]
        self._account([self.correctness, *self.shaping], errors, len(samples))
        error = "; ".join(e for e in errors if e) or None
        per_sample = zip(base, *(vs for vs, _ in shaped), strict=True)
        return [Score(total_reward(vs), bool(vs[0].correct), vs[0], error) for vs in per_sample]

    def _account(self, verifiers: list[CheckedVerifier], errors: list[str | None], num_samples: int) -> None:
        """Count failed batches per verifier, say so once per verifier, stop past ``max_error_frac``."""
        self.num_scored += num_samples
        for verifier, error in zip(verifiers, errors, strict=True):
            if error is None:
                continue
            self.errors[verifier.where] += num_samples
            if verifier.where not in self._reported:
                self._reported.add(verifier.where)
                print(f"[dapo-pl] {error}: these {num_samples} responses count as wrong (see reward/errors)")
        worst, count = max(self.errors.items(), key=lambda kv: kv[1], default=("", 0))
        if count > self.cfg.max_error_frac * self.num_scored:
            last = next((e for e in reversed(errors) if e), "none in this batch")
            raise VerifierError(
                f"{worst} failed on {count} of the {self.num_scored} responses scored so far, more than "
                f"data.reward.max_error_frac={self.cfg.max_error_frac}; last error: {last}. Fix the plugin, "
                "raise data.reward.timeout_s, or raise data.reward.max_error_frac to tolerate it"
            )

    def close(self) -> None:
        for v in [self.correctness, *self.shaping]:
            close = getattr(v.fn, "close", None)
            if callable(close):
                close()

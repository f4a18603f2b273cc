"""dapo-pl plugin ``answer_format``: a shaping reward for ending the response with an ``Answer:`` line.

A *shaping* verifier: ``correct`` is None, so it never decides right or wrong; its reward is added to the
correctness verifier's. It only reads the text, in linear time, and never evaluates it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import Sample, Verdict

_LAST_LINE = re.compile(r"(?:\*\*)?Answer:(?:\*\*)?[ \t]*\S")


class AnswerFormat:
    """Shaping reward: +bonus if the last non-empty line is an 'Answer: ...' line, else penalty."""

    def __init__(self, bonus: float = 0.1, penalty: float = -0.1) -> None:
        self.bonus, self.penalty = float(bonus), float(penalty)

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [self._one(s.response) for s in samples]

    def _one(self, response: str) -> Verdict:
        lines = [line for line in response[-2000:].splitlines() if line.strip()]
        ok = bool(lines) and _LAST_LINE.match(lines[-1].strip()) is not None
        return Verdict(self.bonus if ok else self.penalty, None, lines[-1].strip() if ok else None, None)


@hookimpl
def register_verifiers(register):  # type: ignore[no-untyped-def]
    register("answer_format", AnswerFormat)

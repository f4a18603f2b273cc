"""Built-in verifier ``exact_match``: the final answer must equal the reference exactly (after trimming).

The final answer is the text after the *last* ``Answer:`` marker (DAPO-Math-17k format; ``**Answer:**`` too),
up to the end of that line; without a marker, the whole response (``require_marker=False``) or no answer at
all (``require_marker=True``, the default, so a model cannot be rewarded for a bare guess in another format).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import Sample, Verdict

_MARKER = re.compile(r"(?:\*\*)?Answer:(?:\*\*)?[ \t]*([^\n]*)")


def extract_answer(response: str, require_marker: bool = True) -> str | None:
    """The text after the last ``Answer:`` marker, stripped; None when there is none (or it is empty).

    >>> extract_answer("work...\\nAnswer: 1\\nAnswer: 42\\n")
    '42'
    >>> extract_answer("**Answer:** 7") is None
    False
    """
    matches = _MARKER.findall(response)
    if matches:
        text = matches[-1].strip().strip("*").strip()
    elif require_marker:
        return None
    else:
        text = response.strip()
    return " ".join(text.split()) or None


class ExactMatch:
    """Exact match of the final ``Answer:`` line with the reference (+1 right, -1 wrong)."""

    def __init__(
        self,
        correct_reward: float = 1.0,
        incorrect_reward: float = -1.0,
        require_marker: bool = True,
        case_sensitive: bool = True,
    ) -> None:
        self.correct_reward = float(correct_reward)
        self.incorrect_reward = float(incorrect_reward)
        self.require_marker = require_marker
        self.case_sensitive = case_sensitive

    def _norm(self, text: str) -> str:
        text = " ".join(text.split())
        return text if self.case_sensitive else text.casefold()

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [self._one(s) for s in samples]

    def _one(self, sample: Sample) -> Verdict:
        if sample.reference is None:
            return Verdict(self.incorrect_reward, False, None, "no reference answer")
        extracted = extract_answer(sample.response, self.require_marker)
        correct = extracted is not None and self._norm(extracted) == self._norm(str(sample.reference))
        return Verdict(self.correct_reward if correct else self.incorrect_reward, correct, extracted, None)


@hookimpl
def register_verifiers(register):  # type: ignore[no-untyped-def]
    register("exact_match", ExactMatch)

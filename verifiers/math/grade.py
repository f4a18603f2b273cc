"""Grading one response: :func:`prepare` in the parent (extraction, hacks, exact fast path) and
:func:`judge` in a worker (the symbolic stage) for what the parent could not decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import exact
from .compare import Comparer, ExactEq, Tri
from .extract import extract
from .nodes import Answer, Equation, Raw, Scalar, Seq, Text, Union
from .normalize import Normalized, normalize
from .parser import ParseError, parse_answer
from .text import sanitize


@dataclass(frozen=True)
class Limits:
    """Caps on untrusted input (the factory's options of the same names)."""

    max_response_chars: int = 200_000
    max_answer_chars: int = 1_000
    max_boxes: int = 20
    max_distinct_answers: int = 3


@dataclass(frozen=True)
class Task:
    """What a worker needs to finish a comparison: both parsed answers (small, picklable)."""

    ref: Answer
    cand: Answer


@dataclass(frozen=True)
class Outcome:
    """The parent's result: decided (``correct`` is a bool) or handed to a worker (``task`` set)."""

    correct: bool | None
    extracted: str | None = None
    error: str | None = None
    task: Task | None = None


@dataclass(frozen=True)
class Reference:
    answer: Answer
    norm: Normalized


def to_answer(norm: Normalized) -> Answer:
    """The parsed structure of a normalised answer; text our grammar cannot read becomes :class:`Raw`."""
    if norm.words is not None:
        return Text(norm.words)
    try:
        ans = parse_answer(norm.text)
    except (ParseError, RecursionError):
        ans = Scalar(Raw(" ".join(norm.text.split())))
    if norm.pct or norm.deg:
        if isinstance(ans, Scalar):
            ans = Scalar(ans.node, norm.pct, norm.deg)
        elif isinstance(ans, Equation) and isinstance(ans.rhs, Scalar):
            ans = Equation(ans.lhs, Scalar(ans.rhs.node, norm.pct, norm.deg))
    return ans


@lru_cache(maxsize=4096)
def reference(text: str) -> Reference:
    """The parsed reference (cached: every response of a group shares it)."""
    norm = normalize(sanitize(text)[:10_000])
    return Reference(to_answer(norm), norm)


@lru_cache(maxsize=8192)
def candidate(text: str) -> tuple[Normalized, Answer]:
    norm = normalize(text)
    return norm, to_answer(norm)


def _multi_valued(ans: Answer) -> bool:
    return (isinstance(ans, Seq) and len(ans.items) > 1) or isinstance(ans, Union)


def _hedge(ref: Reference, cand: Normalized) -> str | None:
    """Why the candidate's own wording is a hedge or an open list, or None."""
    if cand.hedge is not None and ref.norm.hedge != cand.hedge:
        return f"reward hacking: hedging word {cand.hedge!r}"
    if cand.ellipsis and not ref.norm.ellipsis:
        return "reward hacking: an open-ended list (\\ldots)"
    return None


def _group_answer(ref: Reference, group: tuple[str, ...]) -> tuple[Answer | None, str | None]:
    """Several different answers side by side: one list answer if the reference has several values, else a hack."""
    parsed = []
    for text in group:
        norm, ans = candidate(text)
        if (why := _hedge(ref, norm)) is not None:
            return None, why
        parsed.append(ans)
    distinct: list[Answer] = []
    judge = Comparer(ExactEq())
    for ans in parsed:
        if not any(judge.answers(d, ans) is True for d in distinct):
            distinct.append(ans)
    if len(distinct) == 1:
        return distinct[0], None
    if _multi_valued(ref.answer):
        return Seq("list", tuple(distinct)), None
    return None, f"reward hacking: {len(distinct)} different answers offered together"


def _choice(ref: Reference, cand: Normalized) -> bool | None:
    """Multiple choice: a reference that is just a letter A-E is matched by the candidate's letter."""
    letters = "".join(ref.norm.text.replace("(", "").replace(")", "").split())
    if ref.norm.choice is None or len(letters) != 1:
        return None
    return cand.choice == ref.norm.choice


def prepare(response: str, ref_text: str | None, limits: Limits) -> Outcome:
    """Everything that needs no algebra: extraction, hack checks, exact comparison."""
    if ref_text is None or not str(ref_text).strip():
        return Outcome(False, error="no reference answer")
    if len(response) > limits.max_response_chars:
        return Outcome(False, error=f"response longer than {limits.max_response_chars} characters")
    ex = extract(sanitize(response), max_boxes=limits.max_boxes, max_distinct=limits.max_distinct_answers)
    if ex.answer is None:
        return Outcome(False, error=ex.error)
    extracted = ex.answer
    if len(extracted) > limits.max_answer_chars:
        return Outcome(False, extracted[:200], f"answer longer than {limits.max_answer_chars} characters")
    ref = reference(str(ref_text))
    norm, cand = candidate(extracted)
    verdict = _choice(ref, norm)
    if verdict is not None:
        return Outcome(verdict, extracted)
    why = _hedge(ref, norm)
    if why is None and len(ex.group) > 1:
        group_ans, why = _group_answer(ref, ex.group)
        cand = group_ans if group_ans is not None else cand
    if why is not None:
        return Outcome(False, extracted, why)
    try:
        result = Comparer(ExactEq()).answers(ref.answer, cand)
    except exact.TooLarge as exc:
        return Outcome(False, extracted, f"too large to compare: {exc}")
    if result is None:
        return Outcome(None, extracted, task=Task(ref.answer, cand))
    return Outcome(result, extracted)


def judge(task: Task) -> tuple[bool, str | None]:
    """The symbolic comparison (worker side): (correct, error)."""
    from .symbolic import SympyEq, Unsupported  # sympy is imported in workers only

    try:
        result: Tri = Comparer(SympyEq()).answers(task.ref, task.cand)
    except exact.TooLarge as exc:
        return False, f"too large to compare: {exc}"
    except Unsupported as exc:
        return False, f"could not compare: {exc}"
    except (RecursionError, ValueError, TypeError, ArithmeticError, AttributeError) as exc:
        return False, f"could not compare: {type(exc).__name__}: {str(exc)[:100]}"
    return bool(result), None

"""The grading policy (compare.py): three-valued in the parent, decided by sympy in the workers.

The symbolic stage (``grade.judge``) is called in-process here; in production it only runs in workers.
"""

from __future__ import annotations

import pytest
from dapo_pl_verifiers.math.compare import Comparer, ExactEq, expand_pm, tri_all, tri_any
from dapo_pl_verifiers.math.grade import Limits, Task, judge, prepare, reference, to_answer
from dapo_pl_verifiers.math.normalize import normalize
from dapo_pl_verifiers.math.parser import parse_value


def parent(ref: str, cand: str) -> bool | None:
    return Comparer(ExactEq()).answers(reference(ref).answer, to_answer(normalize(cand)))


def worker(ref: str, cand: str) -> bool:
    return judge(Task(reference(ref).answer, to_answer(normalize(cand))))[0]


def test_tri_state_helpers() -> None:
    assert tri_all([True, True]) is True and tri_all([True, None]) is None and tri_all([None, False]) is False
    assert tri_any([False, None]) is None and tri_any([None, True]) is True and tri_any([False]) is False


@pytest.mark.parametrize(
    ("ref", "cand", "expected"),
    [
        ("5", "5.0", True), ("1000", "1,000", True), ("\\frac12", "0.5", True), ("\\frac13", "0.33", False),
        ("x=5", "5", True), ("(1,2)", "(2,1)", False), ("\\{1,2\\}", "\\{2,1\\}", True), ("(2,5]", "2<x\\le5", True),
        ("3", "3 \\text{ or } 4", False), ("3", "\\pm 3", False), ("-3, 3", "\\pm 3", True), ("7", "3+4", False),
        ("55", "\\sum_{k=1}^{10} k", False), ("5", "x", False), ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", False),
    ],
)  # fmt: skip
def test_the_parent_decides_exact_cases(ref: str, cand: str, expected: bool) -> None:
    assert parent(ref, cand) is expected


@pytest.mark.parametrize(
    ("ref", "cand"), [("\\sqrt8", "2\\sqrt2"), ("x^2+2x+1", "(x+1)^2"), ("3+4i", "4i+3"), ("\\pi", "3.14")]
)
def test_the_parent_defers_what_needs_algebra(ref: str, cand: str) -> None:
    assert parent(ref, cand) is None


@pytest.mark.parametrize(
    ("ref", "cand", "expected"),
    [
        ("\\sqrt8", "2\\sqrt2", True), ("x^2+2x+1", "(x+1)^2", True), ("x^2+2x+1", "(x-1)^2", False),
        ("3+4i", "4i+3", True), ("3.14", "\\pi", True), ("\\pi", "3.14", False), ("30^\\circ", "\\frac{\\pi}{6}", True),
        ("y=2x+3", "4x - 2y + 6 = 0", True), ("y=2x+3", "y = 2x - 3", False), ("2\\sin x\\cos x", "\\sin 2x", True),
        ("\\frac{\\pi}{2^{99}}", "\\frac{\\pi}{2^{98}}", False), ("e^{10^{-30}}", "1", False),
        ("\\sqrt[3]{2}", "2^{1/3}", True), ("\\frac{1+\\sqrt5}{2}, \\frac{1-\\sqrt5}{2}", "\\frac{1\\pm\\sqrt5}{2}", True),
    ],
)  # fmt: skip
def test_the_symbolic_stage(ref: str, cand: str, expected: bool) -> None:
    assert worker(ref, cand) is expected


def test_plus_minus_expands_to_both_values() -> None:
    values = expand_pm(parse_value("1 \\pm \\sqrt{2}"))
    assert values == [parse_value("1 + \\sqrt{2}"), parse_value("1 - \\sqrt{2}")]
    assert len(expand_pm(parse_value("\\pm 1 \\pm 2"))) == 4


def test_prepare_marks_hacks_and_defers_algebra() -> None:
    limits = Limits()
    hedge = prepare("\\boxed{\\text{maybe } 5}", "5", limits)
    assert hedge.correct is False and "hedging" in (hedge.error or "")
    side_by_side = prepare("\\boxed{3} or \\boxed{4}", "4", limits)
    assert side_by_side.correct is False and "different answers" in (side_by_side.error or "")
    assert prepare("\\boxed{3} or \\boxed{4}", "3, 4", limits).correct is True
    deferred = prepare("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", limits)
    assert deferred.correct is None and deferred.task is not None
    assert prepare("\\boxed{5}", None, limits).error == "no reference answer"

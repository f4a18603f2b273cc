"""Normalisation, the bounded parser and exact arithmetic."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from dapo_pl_verifiers.math import exact
from dapo_pl_verifiers.math.grade import to_answer
from dapo_pl_verifiers.math.nodes import BaseNum, Equation, Interval, Matrix, Raw, Relation, Scalar, Seq, Text
from dapo_pl_verifiers.math.normalize import normalize
from dapo_pl_verifiers.math.parser import MAX_DEPTH, ParseError, parse_answer, parse_value, tokenize


def value(text: str) -> Fraction | None:
    ans = to_answer(normalize(text))
    assert isinstance(ans, Scalar), ans
    return exact.value(ans.node)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", 1000), ("12,345,678", 12345678), ("1\\,000", 1000), ("1{,}000", 1000), ("1,\\!000", 1000),
        ("1 000 000", 1000000), ("\\$1,250.50", Fraction(2501, 2)), ("15\\text{ cm}", 15), ("15 \\mathrm{cm}^2", 15),
        ("42 apples", 42), ("\\frac12", Fraction(1, 2)), ("\\dfrac{3}{4}", Fraction(3, 4)), ("2\\frac{1}{2}", Fraction(5, 2)),
        ("-\\frac{2}{3}", Fraction(-2, 3)), ("0.\\overline{3}", Fraction(1, 3)), ("0.\\overline{36}", Fraction(4, 11)),
        ("3 \\times 10^{5}", 300000), ("2.5E-2", Fraction(1, 40)), ("2^{10}", 1024), ("2^{-99}", Fraction(1, 2**99)),
        ("\\sqrt{16}", 4), ("\\sqrt[3]{-8}", -2), ("\\binom{5}{2}", 10), ("5!", 120), ("|{-3}|", 3), ("3:4", Fraction(3, 4)),
        ("\\left(3\\right)", 3), ("{{5}}", 5), ("\\frac{\\frac{1}{2}}{3}", Fraction(1, 6)),
    ],
)  # fmt: skip
def test_exact_values(text: str, expected: Fraction | int) -> None:
    assert value(text) == expected


def test_flags() -> None:
    assert normalize("50\\%").pct and normalize("30^\\circ").deg and normalize("30^{\\circ}").deg
    assert normalize("45 degrees").deg and normalize("\\approx 3.5").approx
    assert normalize("either 3 or 4").hedge == "either"
    assert normalize("3 (or possibly 4)").hedge == "possibly"
    assert normalize("1, 2, \\ldots").ellipsis
    assert normalize("\\text{(C)}").choice == "C"
    assert normalize("\\text{Monday}").words == "monday"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("(2, 5]", Interval), ("(1, 2)", Seq), ("\\{1, 2\\}", Seq), ("2 < x \\le 5", Relation), ("x = 5", Equation),
        ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", Matrix), ("1011_2", BaseNum), ("\\text{even}", Text),
        ("3 \\text{ or } 4", Seq), ("x \\in [1, 2]", Seq), ("\\mathbb{R}", Interval), ("\\foo{3}", Scalar),
    ],
)  # fmt: skip
def test_structures(text: str, kind: type) -> None:
    assert isinstance(to_answer(normalize(text)), kind)


def test_unknown_commands_become_raw_text() -> None:
    ans = to_answer(normalize("\\foo{3}"))
    assert isinstance(ans, Scalar) and isinstance(ans.node, Raw)


def test_frac_digits_are_arguments() -> None:
    assert parse_value("\\frac123") == parse_value("\\frac{1}{2} \\cdot 3")
    assert [t for _, t in tokenize("\\frac 12")] == ["\\frac", "1", "2"]


@pytest.mark.parametrize(
    "text",
    [
        "{" * (MAX_DEPTH + 5) + "1" + "}" * (MAX_DEPTH + 5),
        "\\frac{1}{" * 60 + "2" + "}" * 60,
        "1+" * 400 + "1",
        "9" * 5000,
        "2 3",
        "(1, 2",
        "@",
    ],
)
def test_parser_limits_raise_quickly(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ParseError):
        parse_answer(text)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "text", ["9^{9^{9^9}}", "2^{10^{8}}", "(10^{1000})^{1000}", "4000!", "10^{10^{10}} - 1"]
)
def test_exact_refuses_huge_values_fast(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(exact.TooLarge):
        exact.value(parse_value(text))
    assert time.perf_counter() - start < 0.5


def test_tiny_values_are_exact() -> None:
    a, b = value("\\frac{1}{2^{99}}"), value("\\frac{1}{2^{98}}")
    assert a is not None and b is not None and a != b and 2 * a == b
    assert value("10^{-30}") != 0


def test_is_simple() -> None:
    simple = ["-3", "0.25", "\\frac{3}{4}", "2\\frac12", "3 \\times 10^{5}", "2^{10}", "\\frac{1}{2^{99}}"]
    unevaluated = ["3+4", "\\sqrt{16}", "2 \\cdot 3", "10!", "\\log_2 8", "e^{i\\pi}"]
    assert all(exact.is_simple(parse_value(s)) for s in simple)
    assert not any(exact.is_simple(parse_value(s)) for s in unevaluated)

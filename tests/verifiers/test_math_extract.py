"""Final-answer extraction: boxes, Answer: lines, final sentences, the last-answer rule, hedges between answers."""

from __future__ import annotations

import time

import pytest
from dapo_pl_verifiers.math.extract import extract, find_boxes
from dapo_pl_verifiers.math.text import sanitize


def ex(text: str, max_boxes: int = 20, max_distinct: int = 3):  # type: ignore[no-untyped-def]
    return extract(sanitize(text), max_boxes=max_boxes, max_distinct=max_distinct)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\fbox{9}", "9"),
        ("thus \\boxed 7.", "7"),
        ("thus \\boxed \\pi", "\\pi"),
        ("\\boxed{\\boxed{7}}", "\\boxed{7}"),  # the outermost box; normalisation unwraps the inner one
        ("Answer: 42", "42"),
        ("**Answer:** $42$", "$42$"),
        ("**Answer**: 42", "42"),
        ("Final Answer: The final answer is $7$. I hope it is correct.", "$7$"),
        ("Answer:\n\n$7$", "$7$"),
        ("The final answer is 3.5.", "3.5"),
        ("So the answer is $x = 2$. Done", "$x = 2$"),
    ],
)
def test_extracts_the_final_answer(text: str, answer: str) -> None:
    assert ex(text).answer == answer


def test_the_last_final_answer_counts() -> None:
    text = "First $\\boxed{5}$. Wait, that was wrong; redoing it carefully gives $\\boxed{7}$."
    assert ex(text).answer == "7"
    assert ex("\\boxed{5}\nLet me re-check the count of cases.\nAnswer: 6").answer == "6"


def test_a_sentence_only_counts_without_box_or_answer_line() -> None:
    assert ex("The answer is 4. Then \\boxed{5} and that is correct.").answer == "5"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no conclusion here", "no final answer"),
        ("", "no final answer"),
        ("Answer:", "no final answer"),
        ("so \\boxed{}", "empty"),
        ("\\boxed{5} and at last \\boxed{ }", "empty"),
        ("the answer is \\boxed{\\frac{1}{2", "truncated"),
        ("\\boxed{5} then \\boxed{", "truncated"),
        ("\\boxed", "truncated"),
    ],
)
def test_no_answer(text: str, error: str) -> None:
    result = ex(text)
    assert result.answer is None and error in (result.error or "")


def test_too_many_boxes_and_too_many_different_answers() -> None:
    assert "more than 20 boxed" in (ex("\\boxed{1}" * 21).error or "")
    spread = " Wait, no. Let me recompute this carefully, step by step. ".join(
        f"\\boxed{{{k}}}" for k in range(4)
    )
    assert "4 different final answers" in (ex(spread).error or "")
    assert ex(spread, max_distinct=4).answer == "3"


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("$\\boxed{3}$ or $\\boxed{4}$", ("3", "4")),
        ("$x=\\boxed{2}$ and $x=\\boxed{3}$", ("2", "3")),
        ("\\boxed{6}\n\nAnswer: 7", ("6", "7")),
        ("It is \\boxed{5}. Alternatively, it could be \\boxed{6} as well.", ("5", "6")),
        ("\\boxed{5}. Wait, I made an error, so the right value is \\boxed{6}.", ("6",)),
        ("So $a = \\boxed{2}$, thus $a + 3 = \\boxed{5}$.", ("5",)),
        ("\\boxed{5} ... \\boxed{5}", ("5",)),
    ],
)
def test_answers_side_by_side_form_a_group(text: str, group: tuple[str, ...]) -> None:
    assert ex(text).group == group


def test_scans_are_linear() -> None:
    start = time.perf_counter()
    for text in [
        "{" * 200_000,
        "\\boxed{" + "{" * 200_000,
        "Answer:" + " " * 200_000,
        "*" * 200_000,
        "$" * 200_000,
    ]:
        ex(text)
    assert time.perf_counter() - start < 2.0


def test_find_boxes_skips_nested_boxes() -> None:
    spans = find_boxes("\\boxed{\\boxed{1} + \\boxed{2}} and \\fbox{3}")
    assert [s.text for s in spans] == ["\\boxed{1} + \\boxed{2}", "3"]


def test_sanitize_removes_invisible_and_control_characters() -> None:
    assert sanitize("1\u200b2\x00\u202e3\ufeff") == "123"
    assert sanitize("x\u00b2 \u2264 \u03c0") == "x^{2} \\le  \\pi "

"""The labelled set (tests/verifiers/data/math_cases.jsonl): the verifier must agree with every label.

The labels are what a careful human grader says (policy: verifiers/math/compare.py). A change that flips any of
them is a change of grading policy and must come with a deliberate relabelling.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

from dapo_pl.verification import Sample

DATA = Path(__file__).parent / "data"
CATEGORIES = {
    "integer_format", "fraction", "decimal_fraction", "radical", "pi_e", "symbolic", "equation",
    "interval_inequality", "set_tuple", "multiple_answers", "complex", "degrees", "scientific", "large_tiny",
    "matrix", "text", "last_answer", "nested_braces", "no_answer", "empty_box", "truncated", "near_miss", "base",
    "format_variant", "hack",
}  # fmt: skip


def test_the_set_covers_every_category(math_cases: list[dict[str, Any]]) -> None:
    counts = Counter(c["category"] for c in math_cases)
    assert len(math_cases) >= 300
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 5, counts
    assert counts["hack"] >= 40
    assert all(isinstance(c["expected"], bool) for c in math_cases)


def test_the_jsonl_is_what_the_generator_writes(math_cases: list[dict[str, Any]], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_math_cases", DATA / "build_math_cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [(c, r, g, e) for c, cases in module.CASES.items() for r, g, e in cases]
    assert [(c["category"], c["response"], c["reference"], c["expected"]) for c in math_cases] == rows


def test_agrees_with_every_label(math_verifier: Any, math_cases: list[dict[str, Any]]) -> None:
    verdicts = math_verifier([Sample(c["response"], c["reference"]) for c in math_cases])
    wrong = [
        f"[{c['category']}] expected {c['expected']}, got {v.correct} (extracted {v.extracted!r}, error {v.error!r}); "
        f"reference {c['reference']!r}; response ...{c['response'][-60:]!r}"
        for c, v in zip(math_cases, verdicts, strict=True)
        if v.correct != c["expected"]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_hack_is_rewarded(math_verifier: Any, math_cases: list[dict[str, Any]]) -> None:
    hacks = [c for c in math_cases if c["category"] == "hack"]
    verdicts = math_verifier([Sample(c["response"], c["reference"]) for c in hacks])
    assert all(v.reward == -1.0 and v.correct is False for v in verdicts)

"""Shared fixtures for the verifier tests: one ``math_equivalence`` verifier (and worker pool) per session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dapo_pl.verification import build_verifier

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def math_verifier() -> Iterator[Any]:
    """The checked ``math_equivalence`` verifier with default options; its workers are started once."""
    verifier = build_verifier("math_equivalence")
    verifier.fn.warm_up()  # type: ignore[attr-defined]
    yield verifier
    verifier.fn.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def math_cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / "math_cases.jsonl").read_text().splitlines()]

"""Tests of the example plugin: the verifier itself, and that dapo-pl finds it through the plugin manager."""

from __future__ import annotations

import pytest
from dapo_pl_answer_format import AnswerFormat

from dapo_pl.verification import (
    Sample,
    VerifierError,
    build_verifier,
    get_plugin_manager,
    reset_plugin_manager,
)


def test_rewards_the_answer_line() -> None:
    verifier = AnswerFormat(bonus=0.5, penalty=-0.25)
    verdicts = verifier([Sample("work\nAnswer: 42", "42"), Sample("the answer is 42", "42"), Sample("", "1")])
    assert [v.reward for v in verdicts] == [0.5, -0.25, -0.25]
    assert all(v.correct is None for v in verdicts)  # shaping only
    assert verdicts[0].extracted == "Answer: 42"


def test_only_the_last_line_counts() -> None:
    (verdict,) = AnswerFormat()([Sample("Answer: 1\nmore text after it", "1")])
    assert verdict.reward == -0.1


@pytest.fixture()
def registered():  # type: ignore[no-untyped-def]
    """The plugin registered by hand, as if installed (works without pip install)."""
    import dapo_pl_answer_format

    reset_plugin_manager()
    pm = get_plugin_manager()
    if pm.get_plugin("answer_format") is None:
        pm.register(dapo_pl_answer_format, name="answer_format")
    yield pm
    reset_plugin_manager()


def test_found_and_checked_by_dapo_pl(registered) -> None:  # type: ignore[no-untyped-def]
    verifier = build_verifier("answer_format", {"bonus": 1.0}, pm=registered)
    assert [v.reward for v in verifier([Sample("Answer: 3", "3")])] == [1.0]
    with pytest.raises(VerifierError, match="bad options"):
        build_verifier("answer_format", {"no_such_option": 1}, pm=registered)

"""The ``math_equivalence`` plugin: registration, options, verdict fields, the parent fast path, serving on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dapo_pl_verifiers.math_equivalence import MathEquivalence

from dapo_pl.verification import Sample, Verdict, VerifierError, available_verifiers, build_verifier


def test_registered_through_the_entry_point() -> None:
    info = available_verifiers()["math_equivalence"]
    assert info.plugin == "math_equivalence (dapo-pl)"
    assert info.factory is MathEquivalence
    assert info.description


def test_verdict_fields(math_verifier: Any) -> None:
    right, wrong, none, hack = math_verifier(
        [
            Sample("so $\\boxed{\\frac{1}{2}}$", "0.5"),
            Sample("Answer: 3", "4"),
            Sample("I give up", "4"),
            Sample("\\boxed{3} or \\boxed{4}", "4"),
        ]
    )
    assert right == Verdict(1.0, True, "\\frac{1}{2}", None)
    assert wrong == Verdict(-1.0, False, "3", None)
    assert none.correct is False and none.extracted is None and "no final answer" in (none.error or "")
    assert hack.correct is False and "reward hacking" in (hack.error or "")


def test_rewards_are_configurable() -> None:
    verifier = build_verifier(
        "math_equivalence", {"correct_reward": 2.0, "incorrect_reward": 0.0, "num_workers": 1}
    )
    try:
        assert [v.reward for v in verifier([Sample("\\boxed{4}", "4"), Sample("\\boxed{5}", "4")])] == [
            2.0,
            0.0,
        ]
    finally:
        verifier.fn.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "options",
    [
        {"timeout_s": 0},
        {"timeout_s": 100},
        {"max_answer_chars": 0},
        {"num_workers": 0},
        {"no_such_option": 1},
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises((VerifierError, ValueError)):
        build_verifier("math_equivalence", options)


def test_exact_answers_never_start_the_workers() -> None:
    verifier = MathEquivalence(num_workers=1)
    try:
        out = verifier([Sample(f"Answer: {k}", str(k % 7)) for k in range(300)])
        assert sum(v.correct for v in out) == sum(1 for k in range(300) if k == k % 7)
        assert verifier.pool.pids == []  # integers and fractions are decided in this process
    finally:
        verifier.close()


def test_odd_samples_are_wrong_not_raised(math_verifier: Any) -> None:
    out = math_verifier(
        [Sample(None, "1"), Sample("\\boxed{1}", None), Sample("", ""), Sample("\\boxed{1}", 1)]
    )  # type: ignore[arg-type]
    assert [v.correct for v in out] == [False, False, False, True]
    assert "not text" in (out[0].error or "") and "no reference" in (out[1].error or "")


def test_a_timeout_is_wrong_with_an_error_and_the_verifier_keeps_serving() -> None:
    verifier = MathEquivalence(timeout_s=0.3, num_workers=1)
    try:
        slow, fine = verifier(
            [Sample("\\boxed{e^{e^{e^{e^{x}}}}}", "x"), Sample("\\boxed{2\\sqrt2}", "\\sqrt8")]
        )
        assert slow.correct is False and "timed out" in (slow.error or "")
        assert fine.correct is True
        assert verifier([Sample("\\boxed{(x+1)^2}", "x^2+2x+1")])[0].correct is True
        assert verifier.pool.replaced >= 1
    finally:
        verifier.close()


def test_identical_answers_are_judged_once(math_verifier: Any) -> None:
    samples = [Sample("\\boxed{\\sqrt{12}}", "2\\sqrt{3}")] * 64
    out = math_verifier(samples)
    assert all(v.correct for v in out)


def test_close_is_safe_twice() -> None:
    verifier = MathEquivalence(num_workers=1)
    verifier.warm_up()
    verifier.close()
    verifier.close()


def test_no_eval_in_the_verifier_source() -> None:
    """The pre-stop check, as a test: no eval/exec/sympify/parse_value call anywhere in the math verifier."""
    import re
    from pathlib import Path

    import dapo_pl_verifiers

    root = Path(dapo_pl_verifiers.__file__).parent
    forbidden = re.compile(r"\b(sympify|parse_expr|eval|exec)\(")
    hits = [
        f"{p}:{n}"
        for p in root.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert not hits


def test_the_training_reward_path_uses_it() -> None:
    from dapo_pl.rewards import RewardConfig, RewardFunction, VerifierSpec

    cfg = RewardConfig(
        VerifierSpec("math_equivalence", {"num_workers": 1}), [VerifierSpec("overlong", {"cache_len": 4})]
    )
    reward = RewardFunction(cfg)
    try:
        samples = [
            Sample("\\boxed{2\\sqrt2}", "\\sqrt8", response_length=10, max_response_length=16),
            Sample("Answer: 3", "4", response_length=14, max_response_length=16),
        ]
        scores = reward(samples)
        assert [s.correct for s in scores] == [True, False]
        assert [s.reward for s in scores] == [1.0, -1.5]  # 14 tokens: 2 into the 4-token overlong zone
    finally:
        reward.close()


@pytest.mark.slow
def test_a_script_without_main_guard_works_and_exits(tmp_path: Path) -> None:
    """Workers must not re-run the user's script, and the pool must not keep the interpreter alive."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from dapo_pl.verification import Sample, build_verifier\n"
        "v = build_verifier('math_equivalence')\n"
        "print(v([Sample('\\\\boxed{2\\\\sqrt2}', '\\\\sqrt8')])[0].correct, flush=True)\n"
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True"]

"""The adversarial suite: no code runs, every input gets a wrong verdict within the limit, memory stays bounded,
and the verifier keeps serving. (Inputs: tests/verifiers/adversarial.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from adversarial import adversarial_inputs
from dapo_pl_verifiers.math_equivalence import MathEquivalence

from dapo_pl.verification import Sample

# Inputs that pass every static check and reach sympy, where they explode: only the worker deadline stops them.
WORKER_BOMBS = [
    ("\\boxed{e^{e^{e^{e^{x}}}}}", "x"),
    ("\\boxed{\\sin(x)^{10^9}}", "\\sin x"),
    ("\\boxed{x^{x^{x^{x}}}}", "x+1"),
    ("\\boxed{x^{x^{x^{x^{x}}}}}", "x"),
]


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_adversarial_suite(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cases = adversarial_inputs(str(marker))
    assert len(cases) >= 261
    verifier = MathEquivalence(timeout_s=1.0)
    try:
        verifier.warm_up()
        rss_before = _rss_mb()
        start = time.perf_counter()
        verdicts = verifier([Sample(response, reference) for _, response, reference in cases])
        batch_s = time.perf_counter() - start
        wrong = [name for (name, _, _), v in zip(cases, verdicts, strict=True) if v.correct is not False]
        assert not wrong, wrong
        assert not marker.exists(), "an injected payload ran"
        assert batch_s < 120, f"{len(cases)} adversarial inputs took {batch_s:.1f} s"
        assert _rss_mb() - rss_before < 300

        for response, reference in WORKER_BOMBS:  # one at a time: each answer within the limit
            t0 = time.perf_counter()
            (verdict,) = verifier([Sample(response, reference)])
            assert verdict.correct is False
            assert time.perf_counter() - t0 < 1.0 + 1.5, response

        ok = verifier([Sample("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), Sample("Answer: 17", "17")])
        assert [v.correct for v in ok] == [True, True]  # still serving
        assert not marker.exists()
    finally:
        verifier.close()

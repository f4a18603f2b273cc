"""Preemption with real signals on a real ``dapo-pl fit``: SIGTERM finishes the step, writes ``last.ckpt``, marks
the MLflow run KILLED and exits 143 with one line saying how to resume; resuming from it is exact. A second
signal abandons the step at once (exit 130 for SIGINT), keeping the previous checkpoint as the resume point.

Checked to fail: without :class:`dapo_pl.preemption.PreemptionCallback` (Lightning's own handler), SIGTERM
exits 0 with no checkpoint of the step it stopped at.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import fit_runs
import pytest
from fit_runs import (
    MAX_STEPS,
    assert_same_after,
    checkpoint_step,
    logged_step,
    reference_run,
    run_fit,
    start_fit,
    the_run,
    wait_for_step,
    wait_until,
)

from dapo_pl.preemption import Preempted, PreemptionAbandoned, PreemptionCallback, resume_hint
from dapo_pl.verification import CheckedVerifier, Sample, Verdict, VerifierInfo

resume_model = fit_runs.resume_model  # the session fixture


@pytest.mark.slow
def test_sigterm_saves_marks_killed_and_resumes_exactly(
    resume_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_run(tmp_path_factory.getbasetemp(), resume_model)
    workdir = tmp_path_factory.mktemp("sigterm")
    proc = start_fit(workdir, resume_model)
    wait_for_step(proc, workdir, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    stderr = (workdir / "stderr.txt").read_text()
    hints = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(hints) == 1 and hints[0].endswith("--ckpt_path last"), stderr[-2000:]
    assert "Traceback" not in stderr
    last = workdir / "checkpoints" / "last.ckpt"
    stopped_at = checkpoint_step(last)
    assert 1 <= stopped_at < MAX_STEPS and stopped_at == logged_step(workdir)  # the step in progress finished
    assert f"after optimizer step {stopped_at}" in hints[0]
    assert the_run(workdir).info.status == "KILLED"

    resumed = run_fit(workdir, resume_model, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert the_run(workdir).info.status == "FINISHED"
    assert_same_after(reference, workdir, after=stopped_at)


@pytest.mark.slow
def test_a_second_sigint_abandons_the_step(resume_model: Path, tmp_path: Path) -> None:
    proc = start_fit(tmp_path, resume_model, ckpt_every=1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    # Checkpoints are saved after every other end-of-step hook, the preemption check included: once step 1's is
    # there, a signal falls in step 2. (Waiting for step 1's metrics raced that check: a signal just after them
    # stopped the fit after step 1, with a checkpoint, and the second one came while it was being written.)
    wait_until(proc, tmp_path, last.exists, "the checkpoint of step 1")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while "SIGINT received" not in (tmp_path / "stderr.txt").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # while step 2 still runs
    assert proc.wait(timeout=300) == 128 + signal.SIGINT
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "second SIGINT" in stderr and "resume with:" in stderr and "Traceback" not in stderr, stderr[
        -2000:
    ]
    # Nothing saved from the abandoned step: step 1's checkpoint stays the resume point.
    assert checkpoint_step(last) == 1
    assert the_run(tmp_path).info.status == "KILLED"


def test_resume_hint_replaces_any_ckpt_path() -> None:
    exc = Preempted(signal.SIGTERM, 12, "ck/last.ckpt")
    hint = resume_hint(exc, ["fit", "--config", "a b.yaml", "--ckpt_path", "ck/x.ckpt"])
    assert hint == (
        "[dapo-pl] stopped by SIGTERM after optimizer step 12; checkpoint ck/last.ckpt; "
        "resume with: dapo-pl fit --config 'a b.yaml' --ckpt_path last"
    )
    abandoned = resume_hint(PreemptionAbandoned(signal.SIGINT), ["fit", "--ckpt_path=last"])
    assert abandoned.endswith("abandoned; resume with: dapo-pl fit --ckpt_path last")


def test_a_second_signal_during_a_verifier_call_is_not_a_verifier_failure() -> None:
    """The handler raises :class:`PreemptionAbandoned` wherever the main thread is; waiting on a verifier call, that
    is inside the guard that turns a plugin's exceptions into wrong answers (``CheckedVerifier.score``). Seen in
    ``test_a_second_sigint_abandons_the_step``: while ``PreemptedFit`` was an ``Exception``, the fit went on and
    stopped with exit 2 on "verifier 'overlong' ... raised PreemptionAbandoned"."""

    def slow(samples: list[Sample]) -> list[Verdict]:
        time.sleep(1.0)
        return [Verdict(0.0, None) for _ in samples]

    verifier = CheckedVerifier(VerifierInfo("slow", lambda: slow, "sleeps", "test"), slow, timeout_s=30)
    callback = PreemptionCallback()
    callback.signum = signal.SIGINT  # the first signal came: the next one abandons the step
    previous = signal.signal(signal.SIGINT, callback._on_signal)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(PreemptionAbandoned):
            verifier.score([Sample("1", "1")], Verdict(-1.0, False))
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)

"""Preemption with real signals on a real ``dapo-pl fit``: SIGTERM finishes the step, writes ``last.ckpt``, marks
the MLflow run KILLED and exits 143 with one line saying how to resume; resuming from it is exact. A second
signal abandons the step at once (exit 130 for SIGINT), keeping the previous checkpoint as the resume point.

Checked to fail: without :class:`dapo_pl.preemption.PreemptionCallback` (Lightning's own handler), SIGTERM
exits 0 with no checkpoint of the step it stopped at.
"""

from __future__ import annotations

import signal
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
)

from dapo_pl.preemption import Preempted, PreemptionAbandoned, resume_hint

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
    proc = start_fit(tmp_path, resume_model)
    wait_for_step(proc, tmp_path, 0)  # step 1 is logged: step 2 (with its rollouts) has just begun
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
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing saved from the abandoned step
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

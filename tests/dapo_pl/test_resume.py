"""Bit-exact resume: kill -9 a real ``dapo-pl fit`` after a checkpoint, resume with ``--ckpt_path last``, and
every metric at every later step and the final weights equal those of the uninterrupted fit.

Shipped quickstart settings, carry-over and validation on; the departures (6 steps, 32 validation prompts, a model
with 500 supervised warm-up steps instead of 1600) and why are in ``fit_runs.py``. The checkpoint the resumed fit
starts from must hold a non-empty carry-over buffer, or the test would not show that the buffer is saved. That is
by construction, not by luck: about 40% of the warm-started model's groups have mixed answers, so a step's last
generation batch usually overshoots its 16 groups, and surplus groups are carried over in most steps. The resume
step comes from the uninterrupted fit's own ``train/carried_group_frac`` history: ``s`` is the first step from
step 2 on that trains on carried-over groups, and the fit resumes from the checkpoint of step ``s - 1``, which
holds them. If there is no such step the test fails and says so (it never skips).

The killed fit writes a checkpoint every step (and keeps them all) and is killed once step ``s`` is logged, so a
checkpoint of step ``s`` may be on disk by then: the checkpoints newer than step ``s - 1`` are removed after the
kill, as if it had come just before them. The one of step ``s - 1`` never races the kill: it is complete before
step ``s`` begins.

Checked to fail (2026-12-06): with ``DAPODataModule.state_dict`` saving empty buffers it fails on the checkpoint's
empty buffer; with ``DAPODataModule.load_state_dict`` dropping the saved buffer it fails on the metrics after the
resume step (the first metric compared, ``rollout/ess``, already differs at step ``s``).
"""

from __future__ import annotations

import random
from pathlib import Path

import fit_runs
import pytest
import torch
from fit_runs import (
    MAX_STEPS,
    assert_same_after,
    checkpoint_step,
    histories,
    kill9,
    raw_steps,
    reference_run,
    run_fit,
    start_fit,
    the_run,
    wait_for_step,
)

from dapo_pl.checkpoint import find_resume_checkpoint, restore_rng_states, rng_states
from dapo_pl.data import PromptRecord
from dapo_pl.datamodule import Group, group_from_state, group_to_state
from dapo_pl.engines import Completion

resume_model = fit_runs.resume_model  # the session fixture


def first_carried_step(reference: Path) -> int:
    """The first step ``s >= 2`` at which the uninterrupted fit trained on carried-over groups (so the
    checkpoint of step ``s - 1`` holds them), with ``s < MAX_STEPS`` so the killed fit is still running at ``s``."""
    frac = histories(reference)["train/carried_group_frac"]
    carried = [step for step, v in frac if v > 0 and 2 <= step < MAX_STEPS]
    assert carried, (
        f"the uninterrupted fit trained on no carried-over group at steps 2..{MAX_STEPS - 1} "
        f"(train/carried_group_frac: {frac}), so no checkpoint would hold the carry-over buffer; the model or "
        "the settings of fit_runs.py no longer give surplus groups (see its docstring)"
    )
    return carried[0]


@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_uninterrupted_fit(
    resume_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_run(tmp_path_factory.getbasetemp(), resume_model)
    s = first_carried_step(reference)

    workdir = tmp_path_factory.mktemp("killed")
    proc = start_fit(workdir, resume_model, ckpt_every=1)
    wait_for_step(proc, workdir, s)  # the checkpoint of step s - 1 is complete, step s is logged
    kill9(proc)
    for later in (workdir / "checkpoints").glob("*.ckpt"):
        if checkpoint_step(later) > s - 1:
            later.unlink()
    path, skipped = find_resume_checkpoint([workdir / "checkpoints"])
    assert path is not None and not skipped
    k = checkpoint_step(Path(path))
    assert k == s - 1
    buffers = torch.load(path, map_location="cpu", weights_only=False)["DAPODataModule"]["buffers"]
    assert len(buffers) == 1 and buffers[0], "the checkpoint holds no carried-over group"
    killed_at = max(raw_steps(workdir, "train/num_gen_batches"))
    assert killed_at > k

    resumed = run_fit(workdir, resume_model, "--ckpt_path", "last", ckpt_every=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert the_run(workdir).info.status == "FINISHED"  # the same MLflow run, continued
    compared = assert_same_after(reference, workdir, after=k)
    assert compared >= 10 * (MAX_STEPS - k)
    # Steps between the checkpoint and the kill were logged twice; readers take the last value per step.
    steps = raw_steps(workdir, "train/num_gen_batches")
    assert all(steps.count(step) == 2 for step in range(k + 1, killed_at + 1)), steps


def test_groups_survive_a_round_trip_through_plain_types() -> None:
    record = PromptRecord(prompt=[{"role": "user", "content": "1+2="}], reference="3", where="f.jsonl:4")
    group = Group(
        record=record,
        prompt_ids=[5, 6, 7],
        completions=[Completion([1, 2], "3", False, [-0.1, -0.2]), Completion([4], "x", True, None)],
        rewards=[1.0, -1.0],
        correct=[True, False],
        extracted=["3", None],
        fresh=False,
    )
    state = group_to_state(group)
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert (
        group_from_state(torch.load(buf, weights_only=True)) == group
    )  # plain types: loads with weights_only


def test_rng_states_round_trip() -> None:
    import numpy as np

    states = rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    restore_rng_states(states)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]

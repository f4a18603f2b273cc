"""Checkpoints that cannot be corrupt: atomic writes on a really full disk (a small tmpfs; a file-size limit where
mounting is not allowed), ``--ckpt_path last`` skipping broken files, and the writable-folder check at start.

Checked to fail: with Lightning's own ``TorchCheckpointIO`` instead of :class:`AtomicCheckpointIO`, the full-disk
save leaves a truncated target file; with ``checkpoint_problem`` always returning None, the truncated
``last.ckpt`` is chosen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from dapo_pl.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    check_writable,
    checkpoint_problem,
    find_resume_checkpoint,
)
from dapo_pl.cli import _resolve_ckpt

MiB = 2**20


def _ckpt(size_mib: float, step: int) -> dict:
    return {"state_dict": {"w": torch.ones(int(size_mib * MiB) // 4)}, "global_step": step}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_file(small_disk: Path) -> None:
    io = AtomicCheckpointIO()
    target = small_disk / "last.ckpt"
    io.save_checkpoint(_ckpt(2, step=10), target)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint(_ckpt(5, step=20), target)  # 2 + 5 MiB > 6 MiB: no space for the new file
    message = str(info.value)
    assert str(target) in message and "No space left on device" in message and "MiB free" in message
    assert os.listdir(small_disk) == ["last.ckpt"]  # the temporary file is gone
    assert checkpoint_problem(target) is None
    assert torch.load(target, weights_only=True)["global_step"] == 10


def test_a_file_size_limit_fails_the_save_cleanly(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (works without root): the write fails with EFBIG; the old file stays whole."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(1, step=3), target)
    script = (
        "import resource, signal, sys, torch\n"
        "from dapo_pl.checkpoint import AtomicCheckpointIO, CheckpointWriteError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))\n"
        "try:\n"
        "    AtomicCheckpointIO().save_checkpoint({'state_dict': {'w': torch.ones(2**20)}}, sys.argv[1])\n"
        "except CheckpointWriteError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert f"could not write the checkpoint {target}" in out.stdout and "too large" in out.stdout.lower()
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["global_step"] == 3


def _trainer(folder: Path, *extra: object) -> SimpleNamespace:
    """The two trainer attributes ``_resolve_ckpt`` reads, around real checkpoint callbacks."""
    callbacks = [ModelCheckpoint(dirpath=str(folder)), *extra]
    return SimpleNamespace(checkpoint_callbacks=callbacks, default_root_dir=str(folder.parent))


def test_ckpt_path_last_skips_a_truncated_file_with_a_warning(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(0.5, step=4), folder / "epoch=0-step=4.ckpt")
    io.save_checkpoint(_ckpt(0.5, step=8), folder / "last.ckpt")
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) * 6 // 10])  # what a copy killed mid-way leaves
    assert checkpoint_problem(folder / "last.ckpt") is not None
    trainer = _trainer(folder, OnExceptionCheckpoint(dirpath=str(folder)))  # no AttributeError with it
    with pytest.warns(UserWarning, match="skipping .*last.ckpt"):
        assert _resolve_ckpt(trainer, "last") == str(folder / "epoch=0-step=4.ckpt")

    (folder / "epoch=0-step=4.ckpt").write_bytes(b"")
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointWriteError, match="no checkpoint in .* can be loaded"),
    ):
        _resolve_ckpt(trainer, "last")
    shutil.rmtree(folder)
    assert _resolve_ckpt(trainer, "last") is None  # nothing there yet: start afresh


def test_find_resume_checkpoint_takes_the_newest_that_loads(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    for i, name in enumerate(["a.ckpt", "b.ckpt", "c.ckpt"]):
        io.save_checkpoint(_ckpt(0.1, step=i), tmp_path / name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / ".c.ckpt.123.tmp").write_bytes(b"partial")  # a temporary file is never a candidate
    assert find_resume_checkpoint([tmp_path]) == (str(tmp_path / "c.ckpt"), [])
    (tmp_path / "c.ckpt").write_bytes(b"not a zip")
    path, skipped = find_resume_checkpoint([tmp_path])
    assert path == str(tmp_path / "b.ckpt") and [s for s, _ in skipped] == [str(tmp_path / "c.ckpt")]


def test_an_unwritable_checkpoint_folder_fails_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=f"checkpoint folder {blocker / 'ck'} cannot be written"):
        check_writable(blocker / "ck")  # a file where a folder should be
    check_writable(tmp_path / "new" / "ck")
    assert (tmp_path / "new" / "ck").is_dir() and not os.listdir(tmp_path / "new" / "ck")


@pytest.mark.slow
def test_fit_on_a_full_disk_stops_with_the_path_and_leaves_a_loadable_last(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    """A real fit whose checkpoint folder is a 25 MiB tmpfs: the step-2 checkpoints (2 x 9.9 MB) fit, the step-4
    one does not. The fit stops with the error naming the file; ``--ckpt_path last`` takes a whole file."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=25m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        from fit_runs import run_fit

        folder = mount / f"ck-{uuid.uuid4().hex[:6]}"
        result = run_fit(tmp_path, quickstart_dir, "--data.val.limit", "8", ckpt_dir=str(folder))
        assert result.returncode == 1, result.stderr[-3000:]
        assert f"could not write the checkpoint {folder}" in result.stderr
        assert "No space left on device" in result.stderr
        path, _ = find_resume_checkpoint([folder])
        assert path is not None and checkpoint_problem(path) is None
        assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)

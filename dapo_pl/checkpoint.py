"""Checkpoints that cannot be corrupt, and everything a resumed fit needs to continue exactly.

- :class:`AtomicCheckpointIO` (installed by ``dapo-pl fit``): each checkpoint is written to a temporary file in
  the target's own folder, fsynced, then renamed over the target, so a kill, a full disk or a crash mid-save
  leaves the previous file whole. A failed write raises :class:`CheckpointWriteError` naming the path.
- :func:`find_resume_checkpoint`: what ``--ckpt_path last`` resumes from: the newest checkpoint in the checkpoint
  folders that opens (:func:`checkpoint_problem`); broken files are skipped with a warning.
- :func:`check_writable`: the checkpoint folders are tried at start, not at the first save.
- :func:`rng_states` / :func:`restore_rng_states`: torch (CPU and CUDA), Python and NumPy generators, as plain
  types so checkpoints load with ``weights_only``.

The data module saves the prompt stream, the training generation counter and the carry-over buffer; the module
saves the RNG states, the non-finite step counters and the MLflow run id (see ``docs/reliability.md``).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the file and the cause (e.g. a full disk)."""


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    free = ""
    try:
        usage = shutil.disk_usage(path.parent)
        free = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on that filesystem)"
    except OSError:
        pass
    return CheckpointWriteError(
        f"could not write the checkpoint {path}: {getattr(exc, 'strerror', None) or exc}{free}. The previous checkpoint files are untouched. "
        "Free some space or point the checkpoint callback's dirpath to another folder, then resume with "
        "--ckpt_path last."
    )


class _RecordingWriter:
    """A file's ``write`` that keeps the OSError it raised: torch reports a failed write without its cause."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.fh.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder, fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = _RecordingWriter(fh)
            torch.save(obj, writer)  # type: ignore[arg-type]  # a writable binary stream
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the checkpoint the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports failed writes as RuntimeError
            cause = writer.error if writer is not None and writer.error is not None else exc
            raise _write_error(path, cause) from exc
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_torch_save` for local paths (remote URLs: unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def install_atomic_checkpoint_io(trainer: Any) -> bool:
    """Use :class:`AtomicCheckpointIO` where the strategy would use plain ``TorchCheckpointIO``; True if done.

    Strategies with their own writers (DeepSpeed, sharded FSDP checkpoints) keep them.
    """
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, empty, not a checkpoint), or None if it opens.

    The file is memory-mapped: its structure and the pickled state are read, the tensors' bytes are not.
    """
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint folder: its writer owns its consistency
        return None if (path / "meta.pt").exists() else "a folder without meta.pt"
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def find_resume_checkpoint(folders: Iterable[str | Path]) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest ``*.ckpt`` (by modification time) in ``folders`` that opens, and the newer ones skipped with why.

    Temporary files of :func:`atomic_torch_save` (``.name.*.tmp``) are never candidates.
    """
    files: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            files |= {p for p in folder.glob("*.ckpt") if not p.name.startswith(".")}
    skipped: list[tuple[str, str]] = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), skipped
        skipped.append((str(path), problem))
    return None, skipped


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write a small file in it, so an unusable folder fails at start."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as fh:
            fh.write(b"dapo-pl")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CheckpointWriteError(
            f"the checkpoint folder {folder} cannot be written ({exc.strerror or exc}): fix its permissions or "
            "choose another dirpath for the checkpoint callback (trainer.callbacks ... ModelCheckpoint.dirpath)"
        ) from exc


# ---- random number generators ---------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """The global generators' states as plain types (tensors, lists, ints): torch CPU/CUDA, Python, NumPy."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)}  # fmt: skip
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to :func:`rng_states`' output (generators it lacks are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        n = states["numpy"]
        keys = np.asarray(n["keys"], dtype=np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))

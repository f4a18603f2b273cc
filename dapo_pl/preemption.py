"""Preemption: SIGTERM (what SLURM and Kubernetes send) and SIGINT (Ctrl-C) stop a fit with a checkpoint.

The first signal lets the current rollout step finish (its updates applied), writes ``last.ckpt`` in the
checkpoint folder, marks the MLflow run ``KILLED`` and ends the fit with :class:`Preempted`; ``dapo-pl`` then
prints one line saying how to resume and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A second
signal abandons the step at once (:class:`PreemptionAbandoned`, no new checkpoint: the previous one stays the
resume point). With several ranks, all of them stop after the same step (their flags are all-reduced each step).
Resuming from the preemption checkpoint is exact like any other (``tests/dapo_pl/test_preemption.py``).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptedFit(BaseException):
    """A fit stopped by SIGTERM/SIGINT (``signum``).

    A ``BaseException``, like ``KeyboardInterrupt``: the signal handler raises it wherever the main thread is, and
    the ``except Exception`` guards on that path (a verifier call's, which counts a plugin's exceptions as wrong
    answers; best-effort logging) must let it through.
    """

    signum: int


class Preempted(PreemptedFit):
    """The fit stopped on a signal after a whole step, with a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, path: str | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "no checkpoint folder configured, nothing saved"
        super().__init__(f"stopped by {name} after optimizer step {step}; {where}")


class PreemptionAbandoned(PreemptedFit):
    """A second signal arrived during a step: the fit stopped at once, without a new checkpoint."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"stopped by a second {signal.Signals(signum).name}: the step in progress was abandoned"
        )


def resume_hint(exc: PreemptedFit, argv: list[str] | None = None) -> str:
    """The one line ``dapo-pl`` prints for a preempted fit: what happened and the command that resumes it."""
    if isinstance(exc, Preempted) and exc.path is None:
        return f"[dapo-pl] {exc}"
    args, rest = [], list(sys.argv[1:] if argv is None else argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--ckpt_path":
            rest = rest[1:]
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return f"[dapo-pl] {exc}; resume with: {shlex.join(['dapo-pl', *args, '--ckpt_path', 'last'])}"


def checkpoint_folder(trainer: L.Trainer) -> str | None:
    """The folder of the first checkpoint callback that has one."""
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None)
        if folder:
            return str(folder)
    return None


class PreemptionCallback(L.Callback):
    """Turns SIGTERM/SIGINT into "finish this step, save, stop" (added to every ``dapo-pl fit``)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._stopping = (
            False  # saving the checkpoint or shutting down: later signals must not interrupt that
        )
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, after Lightning installed its own SIGTERM handler (which stops with exit status 0 and no
        # checkpoint): ours replaces it for the training loop and is undone at teardown.
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if getattr(trainer, "received_sigterm", False):  # caught by Lightning's handler before training began
            self.signum = signal.SIGTERM

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            return
        if self.signum is not None:
            self._stopping = True
            raise PreemptionAbandoned(signum)
        self.signum = signum
        print(
            f"[dapo-pl] {signal.Signals(signum).name} received (pid {os.getpid()}): finishing this step, then "
            "saving a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:  # every rank stops after the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self._stopping = True
        folder = checkpoint_folder(trainer)
        path = str(Path(folder) / "last.ckpt") if folder else None
        if path is not None:
            trainer.save_checkpoint(path)  # collective under sharded strategies: every rank is here
        raise Preempted(self.signum or signal.SIGTERM, trainer.global_step, path)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, PreemptedFit):
            for logger in trainer.loggers:
                if hasattr(logger, "mark_killed"):
                    logger.mark_killed()  # its finalize("failed") then ends the run as KILLED

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

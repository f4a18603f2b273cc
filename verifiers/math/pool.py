"""A persistent pool of worker processes with a hard wall-clock limit per task.

Why not ``concurrent.futures`` or ``signal.alarm``: an executor cannot kill one stuck task, and an alarm only
works in the main thread, in whole seconds, and not inside long C calls (big-integer arithmetic). Here each
worker runs one task at a time; a task past its deadline gets its worker killed (SIGKILL) and replaced, and
the task's result is :data:`TIMEOUT`. A worker that dies (segfault, out of memory) gives :data:`CRASHED`
for its task and is replaced. The pool keeps serving either way.

Workers come from the ``forkserver`` start method where available (a clean, single-threaded server process
that has the heavy imports preloaded, so a replacement starts in about 10 ms and the parent's threads, e.g.
torch's, are never forked), else ``spawn``. Each worker caps its own address space (``memory_mb``).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

TIMEOUT = "timeout"
CRASHED = "crashed"
_START_TIMEOUT_S = 120.0
_MAX_START_FAILURES = 3


@dataclass(frozen=True)
class Result:
    """``status`` is ``ok`` (``value`` holds the task's return), ``error`` (an exception, text in ``message``),
    :data:`TIMEOUT` or :data:`CRASHED`."""

    status: str
    value: Any = None
    message: str = ""


def _resolve(target: str) -> Callable[[Any], Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this platform, or already lower
        pass


def _worker_main(conn: Connection, target: str, memory_mb: int | None) -> None:
    """Child process: resolve the task function, say ready, then answer ``(index, task)`` messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _limit_memory(memory_mb)
    fn = _resolve(target)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, task = msg
        try:
            out = Result("ok", fn(task))
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            out = Result("error", message=f"{type(exc).__name__}: {str(exc)[:200]}")
        try:
            conn.send((index, out))
        except (OSError, ValueError):
            return


_MAIN_LOCK = threading.Lock()


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start workers without re-running the user's ``__main__`` in them.

    forkserver and spawn children normally re-import the main script (so that functions defined there can be
    unpickled); a script without an ``if __name__ == "__main__":`` guard would then run again in every
    worker. Our workers need nothing from ``__main__``, so it is hidden while a worker starts.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_LOCK:
        saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    started: float
    ready: bool = False
    index: int | None = None
    deadline: float = 0.0


@dataclass
class _State:
    """What the exit-time finalizer needs (it must not hold the pool itself)."""

    workers: list[_Worker] = field(default_factory=list)


def _stop(worker: _Worker) -> None:
    try:
        worker.proc.kill()
        worker.proc.join(timeout=2)
    except (OSError, ValueError, AssertionError):
        pass
    try:
        worker.conn.close()
    except OSError:
        pass


def _shutdown(state: _State) -> None:
    for w in state.workers:
        try:
            if w.ready and w.index is None:
                w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in state.workers:
        _stop(w)
    state.workers.clear()


def default_start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class WorkerPool:
    """``map(tasks)`` runs ``target(task)`` for each task in worker processes, each under ``timeout_s``.

    ``target`` is ``"module:function"``, imported in the workers only; ``preload`` lists modules the
    forkserver imports once so that new workers start warm.
    """

    def __init__(
        self,
        target: str,
        num_workers: int,
        timeout_s: float,
        *,
        start_method: str | None = None,
        preload: Sequence[str] = (),
        memory_mb: int | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        method = start_method or default_start_method()
        self._ctx: Any = mp.get_context(method)
        if method == "forkserver" and preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._state = _State()
        self._lock = threading.Lock()
        self._start_failures = 0
        self.replaced = 0  # workers killed or lost and replaced (for logs and tests)
        self._finalizer = weakref.finalize(self, _shutdown, self._state)

    # ---------------------------------------------------------------- lifecycle
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.target, self.memory_mb),
            daemon=True,
            name="dapo-pl-verifier",
        )
        with _main_module_hidden():
            proc.start()
        child.close()
        worker = _Worker(proc, parent, time.monotonic())
        self._state.workers.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        _stop(worker)
        self._state.workers.remove(worker)
        self.replaced += 1
        self._spawn()

    def start(self) -> None:
        """Start the workers now (otherwise the first ``map`` does); does not wait for them."""
        with self._lock:
            while len(self._state.workers) < self.num_workers:
                self._spawn()

    def close(self) -> None:
        """Stop every worker. Safe to call twice; also runs at interpreter exit."""
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._state.workers]

    # ---------------------------------------------------------------- work
    def map(self, tasks: Sequence[Any]) -> list[Result]:
        """Run every task; results in order. Never raises for a task; never waits past the deadlines."""
        if not tasks:
            return []
        if not self._finalizer.alive:
            raise RuntimeError("the worker pool is closed")
        with self._lock:
            while len(self._state.workers) < self.num_workers:
                self._spawn()
            return self._run(list(tasks))

    def _run(self, tasks: list[Any]) -> list[Result]:
        results: list[Result | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while pending or any(w.index is not None for w in self._state.workers):
            self._dispatch(tasks, pending)
            self._collect(results, self._wait_time())
            self._enforce_deadlines(results, pending)
        return [r if r is not None else Result(CRASHED, message="lost") for r in results]

    def _dispatch(self, tasks: list[Any], pending: deque[int]) -> None:
        for w in list(self._state.workers):
            if not pending:
                return
            if w.ready and w.index is None:
                index = pending[0]
                try:
                    w.conn.send((index, tasks[index]))
                except (OSError, ValueError):
                    self._replace(w)
                    continue
                pending.popleft()
                w.index, w.deadline = index, time.monotonic() + self.timeout_s

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._state.workers if w.index is not None]
        deadlines += [w.started + _START_TIMEOUT_S for w in self._state.workers if not w.ready]
        return max(0.0, min(deadlines, default=now + 1.0) - now)

    def _collect(self, results: list[Result | None], timeout: float) -> None:
        by_conn = {w.conn: w for w in self._state.workers}
        for conn in wait(list(by_conn), timeout=timeout):
            w = by_conn[conn]  # type: ignore[index]
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._lost(w, results)
                continue
            index = w.index
            if msg[0] == "ready":
                w.ready = True
                self._start_failures = 0
            elif index is not None and index == msg[0]:
                results[index] = msg[1]
                w.index = None

    def _lost(self, w: _Worker, results: list[Result | None]) -> None:
        w.proc.join(timeout=1.0)  # its pipe closed: it is exiting; reap it for the exit code
        code = w.proc.exitcode if w.proc.exitcode is not None else "unknown"
        if w.index is not None:
            results[w.index] = Result(CRASHED, message=f"worker died (exit code {code})")
        elif not w.ready:
            self._start_failures += 1
            if self._start_failures > _MAX_START_FAILURES:
                raise RuntimeError(f"verifier workers fail to start (exit code {code}); see their stderr")
        self._replace(w)

    def _enforce_deadlines(self, results: list[Result | None], pending: deque[int]) -> None:
        now = time.monotonic()
        for w in list(self._state.workers):
            if w.index is not None and now >= w.deadline:
                results[w.index] = Result(TIMEOUT, message=f"exceeded {self.timeout_s:g} s; worker killed")
                w.index = None
                self._replace(w)
            elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                self._start_failures += 1
                if self._start_failures > _MAX_START_FAILURES:
                    raise RuntimeError("verifier workers do not start in time")
                self._replace(w)


def default_workers() -> int:
    """min(2, CPUs available to this process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))

"""A watchdog on vLLM's engine processes: if one dies, the call waiting on it fails within a second.

Why: vLLM's synchronous client waits for engine output on a queue without a timeout. When the EngineCore process
is killed (OOM killer, ``kill -9``, a segfault), vLLM's own monitor marks the engine dead and shuts its output
thread down, but nothing wakes the waiting ``get_output`` (or a pending ``collective_rpc``): the fit hung forever,
with its MLflow run still RUNNING.

How: a daemon thread waits on the engine processes' sentinels (:func:`multiprocessing.connection.wait`, polling
every ``poll_s``). When one exits it records :class:`EngineDied` (process name, pid, exit code or signal), puts it
into the client's output queue and fails every pending utility call with it, so the waiting call raises at once.
:meth:`EngineWatchdog.guard` turns whatever vLLM then raises into that one clear error. The exception travels up
the training step like any other, so Lightning marks the MLflow run FAILED and the process exits non-zero.

It reaches into vLLM's client (``engine_core.resources.engine_manager.processes``, ``outputs_queue``,
``utility_results``: vLLM 0.32); where those are missing (the in-process engine, another vLLM version) it stays
inactive and says so once in :attr:`EngineWatchdog.active`.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any, TypeVar

T = TypeVar("T")


class EngineDied(RuntimeError):
    """A vLLM engine process exited while the trainer depended on it (unrecoverable: restart the fit)."""


def _describe(proc: Any) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class EngineWatchdog:
    """Watches the engine processes behind an offline ``vllm.LLM`` (see the module docstring)."""

    def __init__(self, llm: Any, poll_s: float = 0.5) -> None:
        self.core: Any = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        manager = getattr(getattr(self.core, "resources", None), "engine_manager", None)
        self.processes: list[Any] = list(getattr(manager, "processes", None) or [])
        self.poll_s = poll_s
        self.error: EngineDied | None = None
        self._stop = threading.Event()
        self.active = bool(self.processes) and hasattr(self.core, "outputs_queue")
        self._thread: threading.Thread | None = None
        if self.active:
            self._thread = threading.Thread(target=self._watch, name="dapo-pl-engine-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        while not self._stop.is_set():
            ready = wait(list(sentinels), timeout=self.poll_s)
            if ready and not self._stop.is_set():
                proc = sentinels[ready[0]]  # type: ignore[index]
                proc.join(timeout=1)
                self._fail(
                    EngineDied(
                        f"the vLLM engine process {proc.name} (pid {proc.pid}) {_describe(proc)}, so the "
                        "rollout it was serving cannot finish. The fit stops here; its last checkpoint resumes "
                        "it (--ckpt_path last). A killed engine often means the machine ran out of memory: "
                        "see data.engine.options (kv_cache_gb, gpu_memory_utilization)."
                    )
                )
                return

    def _fail(self, error: EngineDied) -> None:
        """Record ``error`` and wake every call that waits on the dead engine."""
        self.error = error
        self.core.outputs_queue.put_nowait(error)
        for future in list(getattr(self.core, "utility_results", {}).values()):
            with contextlib.suppress(Exception):  # already done, or cancelled
                future.set_exception(error)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a call into the engine: fail fast if it died before, and name the death if it dies during."""
        if self.error is not None:
            raise EngineDied(str(self.error))
        try:
            yield
        except Exception as exc:
            if self.error is not None and exc is not self.error:
                raise EngineDied(str(self.error)) from exc
            raise

    def stop(self) -> None:
        """Stop watching (before a deliberate shutdown, so it is not reported as a death)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)


def guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate an engine method so it runs under ``self.watchdog.guard()`` (when the engine has a watchdog)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        watchdog = getattr(self, "watchdog", None)
        if watchdog is None:
            return method(self, *args, **kwargs)
        with watchdog.guard():
            return method(self, *args, **kwargs)

    return wrapper

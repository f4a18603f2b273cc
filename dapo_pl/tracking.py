"""MLflow tracking: the default logger of ``dapo-pl fit``, and what it does when the tracking server is away.

The tracking URI is MLflow's own resolution: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default
(``sqlite:///mlflow.db`` in the working directory, no server needed). A remote ``mlflow server`` works the same way.
One MLflow run per fit; resuming from a checkpoint continues the run recorded in that checkpoint.

With a remote server (``http(s)://``), outages never stop or stall training (``docs/reliability.md``):

- When the run is first opened (before the first step) the server must answer within ``connect_timeout_s``
  (default 20 s), else :class:`TrackingUnavailable` says so in one paragraph. MLflow's own retries (7, exponential back-off: 255 s per call) are shortened for this
  process unless the user set them (:data:`HTTP_DEFAULTS`).
- Every write of the run (metrics, params, tags, the config text, sample tables, the final status) goes through one
  background thread, in order (:class:`_Sender`). If the server goes away, training goes on, the writes wait in
  memory, one line says so, and they are sent when it answers again (one more line). A server restarted within
  seconds loses nothing.
- When the fit ends (or fails) the thread gets ``flush_timeout_s`` to deliver what is left; what it could not is
  written to ``mlflow-unsent-<run id>.jsonl`` (in ``spool_dir``) and ``dapo-pl mlflow-replay FILE`` sends it to the
  run later. Lost: only what was buffered when the process was killed with SIGKILL during an outage.

Writes are at-least-once: a request that timed out after the server stored it is sent again, which can leave a
metric point twice in a run's history (same step, same value).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from dapo_pl.errors import DapoUserError

# MLflow's HTTP settings for this process when the user has not set them: a call to a dead server fails in
# seconds instead of MLflow's 255 s of retries; the background thread does its own retrying.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
SPOOL_FORMAT = "dapo-pl-mlflow-spool/1"
_QUEUED_METHODS = ("log_batch", "log_metric", "log_param", "set_tag", "log_text", "log_dict", "log_table",
                   "set_terminated")  # fmt: skip
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class TrackingUnavailable(DapoUserError, RuntimeError):
    """The MLflow tracking server cannot be reached (a user-facing error: the message says what to do)."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_short_http_timeouts() -> None:
    """Apply :data:`HTTP_DEFAULTS` to MLflow's environment settings that the user left unset."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout_s: float = 20.0, what: str = "the fit") -> None:
    """Raise :class:`TrackingUnavailable` unless the server behind ``uri`` answers an HTTP request within
    ``timeout_s`` (any HTTP status counts: authentication is MLflow's business, not the network's)."""
    import requests

    if not is_remote(uri):
        return
    deadline = time.monotonic() + timeout_s
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    said = False
    while True:
        try:
            requests.get(probe, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            return
        except requests.RequestException as exc:
            reason = _reason(exc)
        if not said:  # once, so a user knows what the wait is for
            said = True
            print(f"[dapo-pl] waiting up to {timeout_s:g} s for the MLflow tracking server {uri} ({reason})",
                  file=sys.stderr, flush=True)  # fmt: skip
        if time.monotonic() + 1.0 >= deadline:
            break
        time.sleep(1.0)
    raise TrackingUnavailable(
        f"the MLflow tracking server {uri} did not answer for {timeout_s:g} s ({reason}), so {what} cannot log "
        "to it. Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), or point "
        "MLFLOW_TRACKING_URI (or trainer.logger.init_args.tracking_uri) at one that runs, or unset it to log to "
        "the local default sqlite:///mlflow.db."
    )


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker.lower() in text.lower():
            return marker.lower()
    return type(exc).__name__


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the server did not answer, or answered that it is overloaded or failing."""
    from mlflow.exceptions import RestException

    if isinstance(exc, RestException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return True  # connection errors, timeouts (MLflow wraps them in a plain MlflowException)


class _Sender:
    """One daemon thread that performs queued client calls in order, retrying while the server is away."""

    def __init__(self, client: Any, uri: str, say: Callable[[str], None] = print) -> None:
        self.client, self.uri, self.say = client, uri, say
        self.pending: deque[dict[str, Any]] = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closed = False
        self.down_since: float | None = None
        self.dropped = 0
        self.thread = threading.Thread(target=self._loop, name="dapo-pl-mlflow", daemon=True)
        self.thread.start()

    def put(self, item: dict[str, Any]) -> None:
        with self.cond:
            self.pending.append(item)
            self.cond.notify_all()

    def _take(self) -> dict[str, Any] | None:
        """The next call; consecutive metric batches of one run are merged (up to MLflow's batch limit)."""
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if not self.pending:
                return None
            item = self.pending.popleft()
            while (
                self.pending
                and _is_metrics(item)
                and _is_metrics(self.pending[0])
                and self.pending[0]["run_id"] == item["run_id"]
                and len(item["metrics"]) + len(self.pending[0]["metrics"]) <= _MAX_BATCH
            ):
                item = {**item, "metrics": item["metrics"] + self.pending.popleft()["metrics"]}
            self.busy = True
            return item

    def _loop(self) -> None:
        delay = 0.5
        while (item := self._take()) is not None:
            while True:
                try:
                    perform(self.client, item)
                    break
                except Exception as exc:
                    if not _transient(exc):
                        self.dropped += 1
                        self.say(f"[dapo-pl] MLflow refused a {item['method']} call and it is dropped: {exc}")
                        break
                    self._went_down(exc)
                    if self.closed:  # finalize gave up waiting: hand the call back for the spool file
                        with self.cond:
                            self.pending.appendleft(item)
                            self.busy = False
                            self.cond.notify_all()
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
            delay = 0.5
            self._came_back()
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.say(
                f"[dapo-pl] MLflow at {self.uri} is unreachable ({_reason(exc)}); training goes on and its metrics "
                "are kept until the server answers again"
            )

    def _came_back(self) -> None:
        if self.down_since is not None:
            away = time.monotonic() - self.down_since
            self.down_since = None
            self.say(
                f"[dapo-pl] MLflow at {self.uri} is back after {away:.0f} s; sending what was kept meanwhile "
                f"({len(self.pending)} more calls queued)"
            )

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued call went through (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.pending or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def close(self) -> list[dict[str, Any]]:
        """Stop the thread (after its current attempt) and return the calls it did not deliver, in order."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
        with self.cond:
            left, self.pending = list(self.pending), deque()
        return left


def _is_metrics(item: dict[str, Any]) -> bool:
    return item["method"] == "log_batch" and not item.get("params") and not item.get("tags")


def perform(client: Any, item: dict[str, Any]) -> None:
    """Make the client call that ``item`` (a JSON-able record, see :class:`_QueuedClient`) describes."""
    from mlflow.entities import Metric, Param, RunTag

    if item["method"] == "log_batch":
        client.log_batch(
            item["run_id"],
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in item.get("metrics", [])],
            params=[Param(k, v) for k, v in item.get("params", [])],
            tags=[RunTag(k, v) for k, v in item.get("tags", [])],
        )
    else:
        getattr(client, item["method"])(*item.get("args", []), **item.get("kwargs", {}))


class _QueuedClient:
    """An ``MlflowClient`` whose writes go to the background sender; reads (``get_run``, ...) pass through."""

    def __init__(self, client: Any, sender: _Sender) -> None:
        self._client, self._sender = client, sender

    def __getattr__(self, name: str) -> Any:
        if name not in _QUEUED_METHODS:
            return getattr(self._client, name)
        if name == "log_batch":
            return self._log_batch

        def queued(*args: Any, **kwargs: Any) -> None:
            kwargs.pop("synchronous", None)
            self._sender.put({"method": name, "args": list(args), "kwargs": kwargs})

        return queued

    def _log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **_: Any) -> None:
        self._sender.put(
            {
                "method": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in metrics],
                "params": [[p.key, str(p.value)] for p in params],
                "tags": [[t.key, str(t.value)] for t in tags],
            }
        )


class DAPOMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with MLflow's own default tracking URI (Lightning's ``file:./mlruns`` fails
    with MLflow 3 unless file stores are explicitly allowed), and, for a remote server, writes that never
    block training (see the module docstring).

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name (None: MLflow picks one).
        tracking_uri: None: ``MLFLOW_TRACKING_URI`` or MLflow's default, ``sqlite:///mlflow.db``.
        run_id: continue this run instead of starting one (set automatically on resume).
        log_model: passed to MLFlowLogger (``False``: checkpoints are not uploaded as artifacts).
        tags: run tags.
        connect_timeout_s: a remote server must answer within this many seconds at start.
        flush_timeout_s: at the end, how long unsent writes may wait for an unreachable server before they go to
            the spool file.
        spool_dir: where ``mlflow-unsent-<run id>.jsonl`` is written (``dapo-pl mlflow-replay`` sends it).
    """

    def __init__(
        self,
        experiment_name: str = "dapo-pl",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        log_model: bool = False,
        tags: dict[str, Any] | None = None,
        connect_timeout_s: float = 20.0,
        flush_timeout_s: float = 30.0,
        spool_dir: str = ".",
    ) -> None:
        import mlflow

        uri = tracking_uri or mlflow.get_tracking_uri()
        self._remote = is_remote(uri)
        if self._remote:
            use_short_http_timeouts()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            run_id=run_id,
            log_model=log_model,
            tags=tags,
        )
        self.connect_timeout_s, self.flush_timeout_s, self.spool_dir = (
            connect_timeout_s,
            flush_timeout_s,
            spool_dir,
        )
        self._sender: _Sender | None = None
        self._queued: _QueuedClient | None = None
        self.spool_path: Path | None = None
        self._gave_up = False

    @property
    def experiment(self) -> Any:
        if self._remote and not self._initialized:
            # here, not in __init__: jsonargparse would bury the message in its own while building the logger
            check_reachable(self._tracking_uri, self.connect_timeout_s)
        client = MLFlowLogger.experiment.fget(self)  # type: ignore[attr-defined]
        if not self._remote or not self._initialized:
            return client  # also DummyExperiment on ranks other than 0
        if self._sender is None:
            self._sender = _Sender(client, self._tracking_uri)
            self._queued = _QueuedClient(client, self._sender)
            atexit.register(self._spool_at_exit)
        return self._queued

    def mark_killed(self) -> None:
        """End the run as ``KILLED`` (a preempted fit) instead of ``FAILED`` when Lightning finalizes it."""
        self._killed = True

    def finalize(self, status: str = "success") -> None:
        status = "KILLED" if getattr(self, "_killed", False) else status
        if self._gave_up:  # finalized already, and the server was gone: nothing more to send
            return
        if self._sender is None:
            super().finalize(status)
            return
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(
            status, status.upper()
        )
        self.experiment.set_terminated(self.run_id, status)
        if self._sender.drain(self.flush_timeout_s):
            return
        left, self._sender, self._gave_up = self._sender.close(), None, True
        self._write_spool(left)

    def _spool_at_exit(self) -> None:
        if self._sender is not None and not self._sender.drain(1.0):
            left, self._sender, self._gave_up = self._sender.close(), None, True
            self._write_spool(left)

    def _write_spool(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        path = (Path(self.spool_dir) / f"mlflow-unsent-{self._run_id}.jsonl").absolute()
        with path.open("a", encoding="utf-8") as fh:
            header = {"format": SPOOL_FORMAT, "tracking_uri": self._tracking_uri, "run_id": self._run_id}
            fh.write(json.dumps(header) + "\n")
            for item in items:
                fh.write(json.dumps(item, default=str) + "\n")
        self.spool_path = path
        points = sum(len(i.get("metrics", [])) for i in items)
        print(
            f"[dapo-pl] MLflow at {self._tracking_uri} did not come back within {self.flush_timeout_s:g} s: "
            f"{len(items)} unsent calls ({points} metric points) saved to {path}; send them to run {self._run_id} "
            f"later with: dapo-pl mlflow-replay {path}",
            file=sys.stderr,
        )


# ---- dapo-pl mlflow-replay ---------------------------------------------------------------------------------------
def read_spool(path: str | Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(header, item)`` for every call in a spool file (a file may hold several appended sections)."""
    header: dict[str, Any] | None = None
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("format") == SPOOL_FORMAT:
                header = record
            elif header is None:
                raise ValueError(f"{path}:{number}: not a dapo-pl MLflow spool file (no header line)")
            else:
                yield header, record


def replay(path: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Send a spool file's calls, in order, to its run; returns (calls, metric points). The file is renamed to
    ``*.replayed`` afterwards, so it cannot be sent twice by mistake."""
    import mlflow

    items = list(read_spool(path))
    clients: dict[str, Any] = {}
    points = 0
    for done, (header, item) in enumerate(items):
        uri = tracking_uri or header["tracking_uri"]
        try:
            if uri not in clients:
                if is_remote(uri):
                    use_short_http_timeouts()
                    check_reachable(uri, 20.0, what="the replay")
                clients[uri] = mlflow.MlflowClient(uri)
            perform(clients[uri], item)
        except Exception as exc:  # keep exactly what is not sent yet, so a second replay sends nothing twice
            _rewrite(path, items[done:])
            raise TrackingUnavailable(
                f"{done} of {len(items)} calls sent, then: {exc}; the other {len(items) - done} stay in {path}"
            ) from exc
        points += len(item.get("metrics", []))
    os.replace(path, f"{path}.replayed")
    return len(items), points


def _rewrite(path: str | Path, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    tmp = Path(f"{path}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        last: dict[str, Any] | None = None
        for header, item in items:
            if header is not last:
                fh.write(json.dumps(header) + "\n")
                last = header
            fh.write(json.dumps(item, default=str) + "\n")
    os.replace(tmp, path)


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "mlflow-replay",
        help="send metrics a fit could not deliver to its MLflow server (mlflow-unsent-*.jsonl)",
        description="Send the calls saved in FILE (written when the tracking server was unreachable at the end "
        "of a fit) to the run they belong to, in order. The file is renamed to FILE.replayed afterwards.",
    )
    parser.add_argument("file", metavar="FILE", help="an mlflow-unsent-<run id>.jsonl file")
    parser.add_argument("--tracking-uri", help="send to this server instead of the one recorded in FILE")
    parser.set_defaults(func=run_replay)
    return parser


def run_replay(args: argparse.Namespace) -> int:
    try:
        calls, points = replay(args.file, args.tracking_uri)
    except (OSError, ValueError, TrackingUnavailable) as exc:
        print(f"dapo-pl mlflow-replay: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"replayed {calls} calls ({points} metric points) from {args.file}; renamed to {args.file}.replayed"
    )
    return 0

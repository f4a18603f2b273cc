"""MLflow outages against real processes: a real ``mlflow server`` on a loopback port, stopped with SIGKILL and
started again on the same port and store; "unreachable" is a loopback port nothing listens on.

- unreachable at start: ``dapo-pl fit`` and ``dapo-pl compare`` exit 2 in seconds with one paragraph, no traceback;
- killed mid-run and restarted: training goes on, every metric point of every step reaches the run, two lines say
  when the server went away and came back;
- killed for good: the fit still finishes; the unsent calls land in a spool file that ``dapo-pl mlflow-replay``
  sends once the server is back (points, sample tables and the FINISHED status).

Each step is slowed to ~0.4 s by a verifier plugin registered in the fit's driver script, so the outage spans
steps whatever the machine's speed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

_DRIVER = """
import sys, time
from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import Verdict, get_plugin_manager

class Slow:
    def __call__(self, samples):
        time.sleep(0.4)
        return [Verdict(0.0, len(s.response) % 2 == 0) for s in samples]

class Plugin:
    @hookimpl
    def register_verifiers(self, register):
        register("slow", lambda: Slow(), "0.4 s per batch")

get_plugin_manager().register(Plugin(), name="slow-plugin")
if __name__ == "__main__":
    from dapo_pl.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _closed_port() -> int:
    """A loopback port that was just free: nothing listens there (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``mlflow server`` (sqlite store, proxied artifacts) that a test can kill and start again."""

    def __init__(self, root: Path) -> None:
        beside = Path(sys.executable).with_name("mlflow")
        exe = str(beside) if beside.exists() else shutil.which("mlflow")
        if exe is None:
            pytest.skip("the mlflow command is not installed")
        self.exe, self.root, self.port = exe, root, _closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            self.exe, "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
            str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(
            f"mlflow server not healthy after 120 s: {(self.root / 'server.log').read_text()[-2000:]}"
        )

    def kill(self) -> None:
        """SIGKILL to the server's whole process group (the server and its workers), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture()
def server(tmp_path: Path) -> Any:
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.kill()


def _fit_cmd(workdir: Path, qs: Path, steps: int, *extra: str) -> list[str]:
    driver = workdir / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    return [
        sys.executable, str(driver), "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val", "null", "--data.prompts_per_step", "4", "--data.rollout.n", "4",
        "--model.algorithm.mini_batch_size", "16", "--trainer.max_steps", str(steps),
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--model.export_dir", "null",
        "--data.reward.correctness.name", "slow", "--data.dynamic_sampling.enabled", "false",
        "--trainer.logger.init_args.experiment_name", "outage", *extra,
    ]  # fmt: skip


def _start_fit(url: str, workdir: Path, cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _client(url: str) -> Any:
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # this test's own reads: fail fast too
    return mlflow.MlflowClient(url)


def _wait_for_points(url: str, count: int, fit: subprocess.Popen[str]) -> str:
    """The run id, once the fit's run holds ``count`` points of train/grad_norm (at most 300 s)."""
    client = _client(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert fit.poll() is None, fit.communicate()[1][-3000:]
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/grad_norm")) >= count:
            return str(runs[0].info.run_id)
        time.sleep(0.5)
    fit.kill()
    pytest.fail("the fit logged too few points within 300 s")


def _steps(url: str, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in _client(url).get_metric_history(run_id, metric))


def _run_timed(cmd: list[str], cwd: Path, url: str, wait_s: int) -> tuple[int, list[str], float]:
    """Exit status, output lines, and seconds from the first refused connection (the "waiting up to" line) to the
    error message: the bound then holds however long imports and interpreter exit take on a loaded machine."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, since, until = [], None, None
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when the process exits
        lines.append(line)
        if since is None and f"waiting up to {wait_s} s for the MLflow tracking server {url}" in line:
            since = time.monotonic()
        if until is None and (line.startswith("error: ") or line.startswith("dapo-pl") and "error: " in line):
            until = time.monotonic()
    proc.wait(timeout=600)
    assert since is not None and until is not None, "".join(lines)[-3000:]
    return proc.returncode, lines, until - since


def test_fit_against_an_unreachable_server_fails_in_seconds(quickstart_dir: Path, tmp_path: Path) -> None:
    """MLflow's own retries took 255 s here, then a 125-line traceback."""
    url = f"http://127.0.0.1:{_closed_port()}"
    code, lines, seconds = _run_timed(_fit_cmd(tmp_path, quickstart_dir, 2), tmp_path, url, 20)
    out = "".join(lines)
    assert code == 2, out[-3000:]
    error = next(line for line in lines if line.startswith("error: "))  # the one paragraph of dapo_pl.errors
    assert error.startswith(f"error: the MLflow tracking server {url} did not answer for 20 s"), out[-3000:]
    assert "(connection refused)" in error and "Traceback" not in out
    assert seconds < 35, seconds  # 20 s of probing, then the exit


def test_compare_against_an_unreachable_uri_fails_in_seconds(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    cmd = [
        sys.executable,
        "-m",
        "dapo_pl",
        "compare",
        "some-run",
        "--tracking-uri",
        url,
        "--out",
        str(tmp_path),
    ]
    code, lines, seconds = _run_timed(cmd, tmp_path, url, 10)
    out = "".join(lines)
    assert code == 2, out[-3000:]
    assert lines[-1].startswith(
        f"dapo-pl compare: error: the MLflow tracking server {url} did not answer for 10 s"
    )
    assert "Traceback" not in out
    assert seconds < 25, seconds


def test_server_killed_and_restarted_mid_run_loses_no_point(
    server: Server, quickstart_dir: Path, tmp_path: Path
) -> None:
    steps = 60
    fit = _start_fit(server.url, tmp_path, _fit_cmd(tmp_path, quickstart_dir, steps))
    try:
        run_id = _wait_for_points(server.url, 3, fit)
        server.kill()
        killed = time.monotonic()
        server.start()  # the same store and port: a restart, ~13 s here
        outage = time.monotonic() - killed
        out, err = fit.communicate(timeout=600)
    finally:
        fit.kill()
    assert fit.returncode == 0, err[-3000:]
    assert f"MLflow at {server.url} is unreachable" in out and f"MLflow at {server.url} is back after" in out
    for metric in ("train/grad_norm", "train/reward_mean", "reward/errors", "time/rollout_s"):
        assert _steps(server.url, run_id, metric) == list(range(1, steps + 1)), (metric, outage)
    assert _client(server.url).get_run(run_id).info.status == "FINISHED"


def test_server_lost_for_good_spools_and_replay_delivers(
    server: Server, quickstart_dir: Path, tmp_path: Path
) -> None:
    steps = 12
    cmd = _fit_cmd(
        tmp_path, quickstart_dir, steps, "--trainer.logger.init_args.flush_timeout_s", "3",
        "--trainer.callbacks+=dapo_pl.callbacks.SampleTableCallback", "--trainer.callbacks.every_n_steps", "4",
    )  # fmt: skip
    fit = _start_fit(server.url, tmp_path, cmd)
    try:
        run_id = _wait_for_points(server.url, 2, fit)
        server.kill()
        t0 = time.monotonic()
        out, err = fit.communicate(timeout=600)
    finally:
        fit.kill()
    assert fit.returncode == 0, err[-3000:]
    spool = tmp_path / f"mlflow-unsent-{run_id}.jsonl"
    assert f"dapo-pl mlflow-replay {spool}" in err and spool.exists()
    assert time.monotonic() - t0 < 120  # the rest of the fit plus 3 s of flushing, not MLflow's minutes

    server.start()
    assert len(_steps(server.url, run_id, "train/grad_norm")) < steps  # the points after the kill are missing
    result = subprocess.run(
        [sys.executable, "-m", "dapo_pl", "mlflow-replay", str(spool)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not spool.exists() and Path(f"{spool}.replayed").exists()
    for metric in ("train/grad_norm", "train/acc", "reward/errors"):
        assert _steps(server.url, run_id, metric) == list(range(1, steps + 1)), metric
    client = _client(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert "samples/step_000012.json" in samples  # a sample table logged during the outage

"""Against a real `mlflow server` on a loopback port: two short fits log to it (params, config, metrics, sample
tables, system metrics), then `dapo-pl compare` reads them back and writes CSV, Markdown and PNGs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_executable() -> str:
    beside = Path(sys.executable).with_name("mlflow")  # the venv's own, even when it is not on PATH
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if found is None:
        pytest.skip("the mlflow command is not installed")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with an sqlite store and proxied artifacts in a temporary folder; always stopped."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        _mlflow_executable(), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-queue workers: 2 cores here
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited ({proc.returncode}): {(root / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after 120 s: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (its workers included)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        log.close()


def _fit(url: str, workdir: Path, qs: Path, run_name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val.path", str(qs / "data" / "val.jsonl"), "--data.val.limit", "8", "--data.val_rollout.n", "2",
        "--data.prompts_per_step", "4", "--data.rollout.n", "4", "--model.algorithm.mini_batch_size", "8",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "[]", "--model.export_dir", "null",
        "--trainer.callbacks+=dapo_pl.callbacks.SampleTableCallback", "--trainer.callbacks.every_n_steps", "1",
        "--trainer.callbacks+=dapo_pl.callbacks.SystemMetricsCallback", "--trainer.callbacks.sampling_interval", "1",
        "--trainer.logger.init_args.experiment_name", "server-test", "--trainer.logger.init_args.run_name", run_name,
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def test_two_fits_logged_to_a_server_and_compared(server: str, quickstart_dir: Path, tmp_path: Path) -> None:
    import mlflow

    for name, eps_high in (("clip-0.2", "0.2"), ("clip-0.28", "0.28")):
        result = _fit(server, tmp_path, quickstart_dir, name, "--model.algorithm.eps_high", eps_high)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (
        tmp_path / "mlflow.db"
    ).exists()  # everything went to the server, nothing to the local default

    client = mlflow.MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"clip-0.2", "clip-0.28"}
    run = by_name["clip-0.28"]
    assert run.data.params["model.algorithm.eps_high"] == "0.28"
    assert {"val/acc_avg_at_2", "val/pass_at_2", "train/reward_mean"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    # one table per rollout step, named by the optimizer step after it (a step with nothing to train on, e.g.
    # every group filtered, leaves the count where it was: then a step_000000 table comes first)
    assert samples[-2:] == ["samples/step_000001.json", "samples/step_000002.json"]
    assert set(samples) <= {f"samples/step_{i:06d}.json" for i in range(3)}
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, samples[-1], str(tmp_path))).read_text()
    )
    assert {"prompt", "response", "reward", "verdict"} <= set(table["columns"]) and table[
        "data"
    ]  # log_table JSON

    out = tmp_path / "compare"
    cmd = [sys.executable, "-m", "dapo_pl", "compare", "clip-0.2", "clip-0.28", "--experiment", "server-test"]
    result = subprocess.run(
        [*cmd, "--out", str(out)], cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": server},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "comparison.csv").open(encoding="utf-8") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"clip-0.2", "clip-0.28"}
    assert rows["clip-0.2"]["param:model.algorithm.eps_high"] == "0.2"
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean"))
    assert rows["clip-0.28"]["last_step"] == str(last) and rows["clip-0.28"]["val/acc_avg_at_2:final"] != ""
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| model.algorithm.eps_high | 0.2 | 0.28 |" in md and server in md
    for png in ("val_acc_avg_at_2.png", "val_pass_at_2.png", "train_reward_mean.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png

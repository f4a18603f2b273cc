"""The MLflow writer's parts without a server process: the background sender against a closed loopback port
(nothing is lost, calls come back in order), and ``dapo-pl mlflow-replay`` into an sqlite store (in order, renamed
afterwards, and a failure part-way keeps exactly the calls not sent). The real-server outages are in
test_faults_mlflow.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from dapo_pl.cli import main
from dapo_pl.tracking import HTTP_DEFAULTS, SPOOL_FORMAT, _QueuedClient, _Sender, read_spool


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sender_keeps_every_call_in_order_while_the_server_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.entities import Metric

    for key, value in HTTP_DEFAULTS.items():  # as the logger sets them, but only for this test
        monkeypatch.setenv(key, value)
    said: list[str] = []
    url = f"http://127.0.0.1:{_closed_port()}"
    sender = _Sender(mlflow.MlflowClient(url), url, say=said.append)
    client = _QueuedClient(mlflow.MlflowClient(url), sender)
    for step in range(1, 4):  # returns at once: training never waits
        client.log_batch("run", metrics=[Metric("train/acc", step / 10, 0, step)])
    client.log_text("run", "text", "config.yaml")
    client.set_terminated("run", "FINISHED")
    assert not sender.drain(2.0)
    left = sender.close()
    # the three metric batches were merged into one call, tried first and handed back
    assert [i["method"] for i in left] == ["log_batch", "log_text", "set_terminated"]
    assert left[0]["metrics"] == [
        ["train/acc", 0.1, 0, 1],
        ["train/acc", 0.2, 0, 2],
        ["train/acc", 0.3, 0, 3],
    ]
    assert len(said) == 1 and f"MLflow at {url} is unreachable (connection refused)" in said[0]


def _spool(path: Path, run_id: str, uri: str, items: list[dict[str, Any]]) -> None:
    header = {"format": SPOOL_FORMAT, "tracking_uri": uri, "run_id": run_id}
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, *items]))


def test_replay_sends_in_order_then_renames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    spool = tmp_path / f"mlflow-unsent-{run_id}.jsonl"
    _spool(spool, run_id, uri, [
        {"method": "log_batch", "run_id": run_id, "metrics": [["m", 1.0, 5, 1], ["m", 2.0, 6, 2]]},
        {"method": "log_batch", "run_id": run_id, "metrics": [["m", 3.0, 7, 3]], "params": [["p", "x"]]},
        {"method": "log_table", "args": [run_id], "kwargs": {"data": {"a": [1, 2]}, "artifact_file": "t.json"}},
        {"method": "set_terminated", "args": [run_id, "FINISHED"], "kwargs": {}},
    ])  # fmt: skip
    assert main(["mlflow-replay", str(spool)]) == 0
    assert "replayed 4 calls (3 metric points)" in capsys.readouterr().out
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]
    run = client.get_run(run_id)
    assert run.data.params == {"p": "x"} and run.info.status == "FINISHED"
    assert "t.json" in [a.path for a in client.list_artifacts(run_id)]
    assert not spool.exists() and Path(f"{spool}.replayed").exists()


def test_a_failed_replay_keeps_exactly_what_was_not_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    spool = tmp_path / "spool.jsonl"
    items = [
        {"method": "log_batch", "run_id": run_id, "metrics": [["m", 1.0, 5, 1]]},
        {"method": "log_batch", "run_id": "no-such-run", "metrics": [["m", 2.0, 6, 2]]},
        {"method": "log_batch", "run_id": run_id, "metrics": [["m", 3.0, 7, 3]]},
    ]
    _spool(spool, run_id, uri, items)
    assert main(["mlflow-replay", str(spool)]) == 2
    assert "1 of 3 calls sent" in capsys.readouterr().err
    assert [item for _, item in read_spool(spool)] == items[
        1:
    ]  # the sent one is gone, the rest kept in order
    assert [m.value for m in client.get_metric_history(run_id, "m")] == [1.0]

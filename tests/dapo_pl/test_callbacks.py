"""The MLflow callbacks: sample-generation tables every N steps and system metrics, on a local sqlite store."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dapo_pl.callbacks import SampleTableCallback, SystemMetricsCallback, sample_table, shorten
from dapo_pl.tracking import DAPOMLFlowLogger

SAMPLES = [
    {"prompt": "12+3=", "response": "Answer: 15", "reference": "15", "reward": 1.0, "correct": True,
     "extracted": "15", "truncated": False, "kept": True},
    {"prompt": "12+3=", "response": "Answer: 16", "reference": "15", "reward": -1.0, "correct": False,
     "extracted": "16", "truncated": False, "kept": True},
    {"prompt": "9+9=", "response": "Answer: 1888888", "reference": "18", "reward": -1.25, "correct": False,
     "extracted": None, "truncated": True, "kept": False},
]  # fmt: skip


def test_shorten_keeps_head_and_tail() -> None:
    assert shorten("abcdefghij", 6) == "abc…[4 chars cut]…hij"
    assert shorten("abc", 6) == "abc" and shorten("abcdefghij", None) == "abcdefghij"


def test_sample_table_columns() -> None:
    table = sample_table(SAMPLES, step=10, max_rows=2, max_chars=None)
    assert table["step"] == [10, 10] and table["verdict"] == ["correct", "wrong"]
    assert table["reward"] == [1.0, -1.0] and table["prompt"] == ["12+3=", "12+3="]
    assert set(table) == {
        "step",
        "prompt",
        "response",
        "reference",
        "extracted",
        "reward",
        "verdict",
        "truncated",
        "kept",
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'runs.db'}"  # created once: a new store takes seconds


@pytest.fixture
def logger(store: str) -> DAPOMLFlowLogger:
    return DAPOMLFlowLogger(experiment_name="callbacks", tracking_uri=store)  # a new run per test


def _trainer(logger: Any, step: int) -> Any:
    return SimpleNamespace(loggers=[logger], global_step=step, is_global_zero=True)


def test_sample_tables_every_n_steps_are_mlflow_tables(logger: DAPOMLFlowLogger) -> None:
    """every_n_steps=4 with 2 optimizer steps per rollout step (global_step 2, 4, 6, ...): tables at the first
    step and whenever a multiple of 4 is reached -> steps 2, 4, 8, 12."""
    callback = SampleTableCallback(every_n_steps=4, max_rows=3)
    module = SimpleNamespace(last_rollout_samples=SAMPLES)
    for step in range(2, 14, 2):
        callback.on_train_batch_end(_trainer(logger, step), module)  # type: ignore[arg-type]
    client = logger.experiment
    paths = sorted(a.path for a in client.list_artifacts(logger.run_id, "samples"))
    assert paths == [f"samples/step_{s:06d}.json" for s in (2, 4, 8, 12)]
    with tempfile.TemporaryDirectory() as tmp:
        saved = json.loads(
            Path(client.download_artifacts(logger.run_id, "samples/step_000008.json", tmp)).read_text()
        )
    table = {c: [row[i] for row in saved["data"]] for i, c in enumerate(saved["columns"])}  # log_table's JSON
    assert table["verdict"] == ["correct", "wrong", "wrong"] and table["step"] == [8, 8, 8]
    assert table["reward"] == [1.0, -1.0, -1.25] and table["truncated"] == [False, False, True]
    assert table["extracted"] == ["15", "16", None] and table["kept"] == [True, True, False]


def test_sample_tables_resume_mid_way_and_without_samples(logger: DAPOMLFlowLogger) -> None:
    callback = SampleTableCallback(every_n_steps=10, log_first_step=False)
    module = SimpleNamespace(last_rollout_samples=SAMPLES)
    for step in (13, 14, 20, 21):  # resumed at step 12: the next table is at 20, not at 13
        callback.on_train_batch_end(_trainer(logger, step), module)  # type: ignore[arg-type]
    assert [a.path for a in logger.experiment.list_artifacts(logger.run_id, "samples")] == [
        "samples/step_000020.json"
    ]
    assert callback.log_samples(_trainer(logger, 30), [], 30) is None  # nothing generated: nothing logged


def test_system_metrics_are_logged_to_the_run(logger: DAPOMLFlowLogger) -> None:
    pytest.importorskip("psutil")
    callback = SystemMetricsCallback(sampling_interval=0.2)
    trainer = _trainer(logger, 0)
    callback.on_fit_start(trainer, None)  # type: ignore[arg-type]
    time.sleep(1.5)
    callback.teardown(trainer, None, "fit")  # type: ignore[arg-type]
    metrics = logger.experiment.get_run(logger.run_id).data.metrics
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )
    history = logger.experiment.get_metric_history(logger.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and sorted(m.step for m in history) == list(range(len(history)))

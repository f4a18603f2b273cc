"""Lightning callbacks that log to the run's MLflow logger: sample generations and system metrics.

YAML (``trainer.callbacks``)::

    - class_path: dapo_pl.callbacks.SampleTableCallback
      init_args: {every_n_steps: 10, max_rows: 32}
    - class_path: dapo_pl.callbacks.SystemMetricsCallback
      init_args: {sampling_interval: 10.0}

Both need an MLflow logger (``trainer.logger``, the default :class:`~dapo_pl.tracking.DAPOMLFlowLogger`); with
another logger they warn once and do nothing. Only global rank 0 logs.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

SAMPLE_COLUMNS = (
    "step", "prompt", "response", "reference", "extracted", "reward", "verdict", "truncated", "kept",
)  # fmt: skip


def _mlflow_logger(trainer: L.Trainer) -> Any | None:
    """The first logger with an MLflow client (``experiment``) and a run id, if any."""
    for logger in trainer.loggers:
        if hasattr(logger, "run_id") and hasattr(logger, "experiment") and hasattr(logger, "_tracking_uri"):
            return logger
    return None


def shorten(text: str, max_chars: int | None) -> str:
    """``text`` cut to about ``max_chars`` keeping its head and tail (the final answer is at the end).

    ``shorten("abcdefghij", 6) == "abc…[4 chars cut]…hij"``; None or a short text is returned unchanged.
    """
    if max_chars is None or len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}…[{len(text) - max_chars} chars cut]…{text[-tail:]}"


def sample_table(
    samples: list[dict[str, Any]], step: int, max_rows: int, max_chars: int | None
) -> dict[str, list]:
    """Columns of the sample table: the first ``max_rows`` responses (whole groups first), with their verdicts."""
    rows = samples[:max_rows]
    verdict = {True: "correct", False: "wrong", None: "unknown"}
    return {
        "step": [step] * len(rows),
        "prompt": [shorten(str(s.get("prompt", "")), max_chars) for s in rows],
        "response": [shorten(str(s.get("response", "")), max_chars) for s in rows],
        "reference": [str(s.get("reference", "")) for s in rows],
        "extracted": [s.get("extracted") for s in rows],
        "reward": [float(s.get("reward", float("nan"))) for s in rows],
        "verdict": [verdict.get(_as_bool(s.get("correct")), "unknown") for s in rows],
        "truncated": [bool(s.get("truncated", False)) for s in rows],
        "kept": [bool(s.get("kept", False)) for s in rows],
    }


def _as_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


class SampleTableCallback(L.Callback):
    """Logs a table of sample generations (prompt, response, reference, extracted answer, reward, verdict,
    truncated, kept by dynamic sampling) to MLflow every ``every_n_steps`` optimizer steps.

    The rows come from the LightningModule's ``last_rollout_samples`` (the last rollout step's responses, in
    group order). Each table is its own artifact, ``samples/step_000010.json`` (MLflow's ``log_table`` JSON,
    shown as a table in the UI's artifact view): one growing file would be downloaded and rewritten on every log.

    Args:
        every_n_steps: log when ``trainer.global_step`` (optimizer steps; the table is named after it) reaches a new
            multiple of it; with several updates per rollout, the first rollout step that crosses it.
        max_rows: responses per table (the first ones, so whole groups of a few prompts).
        max_chars: longer prompts/responses keep their head and tail (None: whole).
        log_first_step: also log after the first training step.
        artifact_dir: folder of the tables inside the run's artifacts.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        max_rows: int = 32,
        max_chars: int | None = 10_000,
        log_first_step: bool = True,
        artifact_dir: str = "samples",
    ) -> None:
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError(f"every_n_steps and max_rows must be >= 1, got {every_n_steps}, {max_rows}")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.max_chars = max_chars
        self.log_first_step = log_first_step
        self.artifact_dir = artifact_dir.strip("/")
        self._last_bucket: int | None = None
        self._warned = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        bucket = step // self.every_n_steps
        first = self._last_bucket is None
        # the first call compares with the step before it: a fit resumed mid-way does not log at once
        last = (step - 1) // self.every_n_steps if first and step else (self._last_bucket or 0)
        due = bucket > last or (first and self.log_first_step)
        self._last_bucket = bucket
        if due and trainer.is_global_zero:
            self.log_samples(trainer, getattr(pl_module, "last_rollout_samples", None) or [], step)

    def log_samples(self, trainer: L.Trainer, samples: list[dict[str, Any]], step: int) -> str | None:
        """Log ``samples`` as the table of ``step``; returns the artifact path (None if nothing was logged)."""
        logger = _mlflow_logger(trainer)
        if logger is None:
            if not self._warned:
                rank_zero_warn("SampleTableCallback needs an MLflow logger; no sample tables will be logged")
                self._warned = True
            return None
        if not samples:
            return None
        path = f"{self.artifact_dir}/step_{step:06d}.json"
        table = sample_table(samples, step, self.max_rows, self.max_chars)
        logger.experiment.log_table(logger.run_id, data=table, artifact_file=path)
        return path


class SystemMetricsCallback(L.Callback):
    """Logs system metrics (CPU, memory, disk, network; GPU with ``pynvml``) to the fit's MLflow run.

    MLflow collects them with its own monitor (the one ``mlflow.start_run(log_system_metrics=True)`` starts),
    in a background thread, every ``sampling_interval`` seconds, as ``system/...`` metrics whose step counts
    samples. It needs ``psutil``; without it the callback warns and does nothing. A resumed run continues the
    system metrics' steps.

    Args:
        sampling_interval: seconds between samples.
        samples_before_logging: samples averaged into one logged point.
    """

    def __init__(self, sampling_interval: float = 10.0, samples_before_logging: int = 1) -> None:
        self.sampling_interval = sampling_interval
        self.samples_before_logging = samples_before_logging
        self._monitor: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._monitor is not None:
            return
        logger = _mlflow_logger(trainer)
        if logger is None:
            rank_zero_warn("SystemMetricsCallback needs an MLflow logger; no system metrics will be logged")
            return
        try:
            import psutil  # noqa: F401  (MLflow's monitors need it and fail late without it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as exc:
            rank_zero_warn(f"system metrics need psutil (pip install psutil): {exc}")
            return
        self._monitor = SystemMetricsMonitor(
            logger.run_id,
            sampling_interval=self.sampling_interval,
            samples_before_logging=self.samples_before_logging,
            resume_logging=True,
            tracking_uri=logger._tracking_uri,
        )
        self._monitor.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()  # stops the thread and flushes what it sampled
            # MLflow's monitor drops a partly sampled interval at shutdown, so a fit shorter than sampling_interval
            # would have no system metrics at all: log one closing sample.
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # the run may already be closed; metrics are best effort here
                rank_zero_warn(f"could not log the closing system-metrics sample: {exc}")

"""MLflow tracking: the default logger of ``dapo-pl fit``.

The tracking URI is MLflow's own resolution: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default
(``sqlite:///mlflow.db`` in the working directory, no server needed). A remote ``mlflow server`` works the same way.
One MLflow run per fit; resuming from a checkpoint continues the run recorded in that checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import MLFlowLogger


class DAPOMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with MLflow's own default tracking URI (Lightning's ``file:./mlruns`` fails
    with MLflow 3 unless file stores are explicitly allowed).

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name (None: MLflow picks one).
        tracking_uri: None: ``MLFLOW_TRACKING_URI`` or MLflow's default, ``sqlite:///mlflow.db``.
        run_id: continue this run instead of starting one (set automatically on resume).
        log_model: passed to MLFlowLogger (``False``: checkpoints are not uploaded as artifacts).
        tags: run tags.
    """

    def __init__(
        self,
        experiment_name: str = "dapo-pl",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        log_model: bool = False,
        tags: dict[str, Any] | None = None,
    ) -> None:
        import mlflow

        uri = tracking_uri or mlflow.get_tracking_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            run_id=run_id,
            log_model=log_model,
            tags=tags,
        )

    def mark_killed(self) -> None:
        """End the run as ``KILLED`` (a preempted fit) instead of ``FAILED`` when Lightning finalizes it."""
        self._killed = True

    def finalize(self, status: str = "success") -> None:
        super().finalize("KILLED" if getattr(self, "_killed", False) else status)

"""avg@K and pass@K (``dapo_pl.module.validation_metrics``) against hand-computed values on fixed samples, the
epoch aggregation over validation batches, and `dapo-pl validate` logging them to MLflow."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dapo_pl.module import DAPOModule, validation_metrics, validation_metrics_from_sums, validation_sums

REPO = Path(__file__).resolve().parents[2]


def pass_at_k_reference(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
    written as a float64 product with a plain loop."""
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def test_hand_computed_avg_and_pass_at_4() -> None:
    """Three prompts x K=4 samples:
    prompt 0: 1 0 0 1 -> 2 right;  prompt 1: 0 0 0 0 -> 0 right;  prompt 2: 1 1 1 1 -> 4 right.
    avg@4 = (2 + 0 + 4) / 12 = 0.5 (the mean over all samples, i.e. the mean of per-prompt means 1/2, 0, 1);
    pass@4 = prompts with at least one right answer / prompts = 2 / 3."""
    correct = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    metrics = validation_metrics(correct)
    assert metrics == {"val/acc_avg_at_4": 0.5, "val/pass_at_4": pytest.approx(2 / 3, abs=1e-7)}


def test_hand_computed_k1_and_k32() -> None:
    """K = 1: avg@1 = pass@1 = share right (1 of 4 prompts -> 0.25). K = 32 (the paper's AIME avg@32) on 2 prompts:
    8 and 0 right of 32 -> avg@32 = 8 / 64 = 0.125, pass@32 = 1 / 2."""
    assert validation_metrics(torch.tensor([[True], [False], [False], [False]])) == {
        "val/acc_avg_at_1": 0.25, "val/pass_at_1": 0.25,
    }  # fmt: skip
    correct = torch.zeros(2, 32, dtype=torch.bool)
    correct[0, [1, 5, 9, 13, 17, 21, 25, 29]] = True
    assert validation_metrics(correct) == {"val/acc_avg_at_32": 0.125, "val/pass_at_32": 0.5}


def test_pass_at_k_equals_the_unbiased_estimator_with_n_equal_k() -> None:
    """With n = k samples the unbiased estimator is 1 if any sample is right, else 0: the module's pass@K."""
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(50, 8, generator=gen) < 0.2  # [P, K], some prompts with no right answer
    expected = sum(pass_at_k_reference(8, int(row.sum()), 8) for row in correct) / 50
    avg = sum(float(x) for row in correct for x in row) / (50 * 8)
    metrics = validation_metrics(correct)
    assert math.isclose(metrics["val/pass_at_8"], expected, abs_tol=1e-7)
    assert math.isclose(metrics["val/acc_avg_at_8"], avg, abs_tol=1e-7)
    assert pass_at_k_reference(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))


def test_validation_epoch_pools_all_batches_not_their_means() -> None:
    """Batches of 1 and 3 prompts (K = 2): [[1, 1]] and [[0, 0], [0, 0], [0, 1]] -> 3 right of 8 samples:
    avg@2 = 3/8 = 0.375 (a mean of batch means would give (1 + 1/6) / 2 = 0.583); pass@2 = 2/4 = 0.5."""
    module = DAPOModule("unused")
    logger = _Logger()
    fake_trainer: Any = SimpleNamespace(
        global_step=7,
        sanity_checking=True,
        is_global_zero=True,
        progress_bar_callback=None,
        loggers=[logger],
        world_size=1,
    )
    module._trainer = fake_trainer
    module._val_correct = [
        torch.tensor([[True, True]]),
        torch.tensor([[False, False], [False, False], [False, True]]),
    ]
    module.on_validation_epoch_end()
    assert logger.logged == [({"val/acc_avg_at_2": 0.375, "val/pass_at_2": 0.5}, 7)]
    assert module._val_correct == []


def test_ranks_pool_counts_not_their_means() -> None:
    """The same two batches on two data-parallel ranks: counts [3 right, 8 samples, 2 passed, 4 prompts] summed
    over ranks give the pooled 0.375 / 0.5; an empty rank (0 prompts) adds nothing."""
    rank0 = validation_sums(torch.tensor([[True, True]]))
    rank1 = validation_sums(torch.tensor([[False, False], [False, False], [False, True]]))
    empty = validation_sums(torch.zeros(0, 2, dtype=torch.bool))
    summed = [a + b + c for a, b, c in zip(rank0, rank1, empty, strict=True)]
    assert summed == [3.0, 8.0, 2.0, 4.0]
    assert validation_metrics_from_sums(summed, 2) == ({"val/acc_avg_at_2": 0.375, "val/pass_at_2": 0.5}, 4)


@pytest.mark.slow
def test_validate_command_logs_avg_and_pass_at_k(quickstart_dir: Path, tmp_path: Path) -> None:
    """`dapo-pl validate` evaluates with its own sampling settings (val_rollout) and logs avg@K / pass@K."""
    import mlflow

    args = [
        sys.executable, "-m", "dapo_pl", "validate", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(quickstart_dir / "model"),
        "--data.train.path", str(quickstart_dir / "data" / "train.jsonl"),
        "--data.val.path", str(quickstart_dir / "data" / "val.jsonl"), "--data.val.limit", "6",
        "--data.val_rollout.n", "3", "--data.val_batch_prompts", "4",
        "--trainer.logger.init_args.run_name", "eval-only",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs.db'}"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(6 prompts)" in result.stdout  # two batches (4 + 2 prompts) pooled into one evaluation
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.run_name == "eval-only"
    avg, pass_k = run.data.metrics["val/acc_avg_at_3"], run.data.metrics["val/pass_at_3"]
    assert 0 <= avg <= pass_k <= 1
    assert round(avg * 18) == pytest.approx(avg * 18, abs=1e-4)  # a count of right answers out of 6 x 3
    assert round(pass_k * 6) == pytest.approx(pass_k * 6, abs=1e-4)

"""avg@K and pass@K at validation (``dapo_pl.evaluation.evaluation_metrics`` of the module's vote matrix) against
hand-computed values on fixed samples, the epoch aggregation over validation batches, and `dapo-pl validate`
logging and printing them (with pass@k / maj@k for every configured k and their intervals)."""

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

from dapo_pl.evaluation import EvalStatsConfig, evaluation_metrics
from dapo_pl.module import DAPOModule


def validation_metrics(correct: torch.Tensor) -> dict[str, float]:
    """avg@K and pass@K only (k = K, no intervals) of a correctness matrix; wrong samples vote for one answer."""
    votes = torch.where(correct, 0, 1)  # [P, K]
    metrics = evaluation_metrics(votes, EvalStatsConfig(k=(), bootstrap=0))
    return {k: v for k, v in metrics.items() if not k.startswith("val/maj_at_")}


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
    avg@2 = 3/8 = 0.375 (a mean of batch means would give (1 + 1/6) / 2 = 0.583); pass@2 = 2/4 = 0.5.
    maj@2: prompt 0 right (1); prompts 1-2 vote wrong; prompt 3 ties 1-1 between a wrong answer given first and the
    right one -> wrong: 1/4. The logged dict also holds the default pass@1 / maj@1 (= avg@2) and intervals."""
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
    module._val_votes = [torch.tensor([[0, 0]]), torch.tensor([[1, 1], [1, 2], [1, 0]])]
    module.on_validation_epoch_end()
    ((metrics, step),) = logger.logged
    assert step == 7
    assert {k: metrics[k] for k in ("val/acc_avg_at_2", "val/pass_at_2", "val/maj_at_2", "val/pass_at_1")} == {
        "val/acc_avg_at_2": 0.375, "val/pass_at_2": 0.5, "val/maj_at_2": 0.25, "val/pass_at_1": 0.375,
    }  # fmt: skip
    assert metrics["val/acc_avg_at_2_ci_low"] <= 0.375 <= metrics["val/acc_avg_at_2_ci_high"]
    assert module._val_votes == []


@pytest.mark.slow
def test_validate_command_logs_avg_and_pass_at_k(quickstart_dir: Path, tmp_path: Path) -> None:
    """`dapo-pl validate` evaluates with its own sampling settings (val_rollout), logs avg@K, pass@k and maj@k
    for every configured k with their bootstrap intervals, and prints each with its interval."""
    import mlflow

    args = [
        sys.executable, "-m", "dapo_pl", "validate", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(quickstart_dir / "model"),
        "--data.train.path", str(quickstart_dir / "data" / "train.jsonl"),
        "--data.val.path", str(quickstart_dir / "data" / "val.jsonl"), "--data.val.limit", "6",
        "--data.val_rollout.n", "3", "--data.val_batch_prompts", "4", "--data.val_stats.k", "[1, 2]",
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
    logged = run.data.metrics
    for name in ("acc_avg_at_3", "pass_at_1", "pass_at_2", "pass_at_3", "maj_at_1", "maj_at_2", "maj_at_3"):
        low, high = logged[f"val/{name}_ci_low"], logged[f"val/{name}_ci_high"]
        assert 0 <= low <= logged[f"val/{name}"] <= high <= 1, name
    assert logged["val/pass_at_1"] == pytest.approx(avg, abs=1e-12)  # pass@1 is avg@n
    assert logged["val/pass_at_1"] <= logged["val/pass_at_2"] <= pass_k
    line = next(ln for ln in result.stdout.splitlines() if "validation at step 0" in ln)
    for short in ("avg@3", "pass@1", "pass@2", "pass@3", "maj@1", "maj@2", "maj@3"):
        value = logged[f"val/{short.replace('avg@', 'acc_avg_at_').replace('@', '_at_')}"]
        assert f"{short} {value:.3f} [" in line, line

"""End to end: `dapo-pl fit` on the quickstart model and data, as a user runs it, tracked in MLflow (sqlite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN_METRICS = [
    "train/reward_mean", "train/acc", "train/entropy", "train/clipfrac_high", "train/clipfrac_low",
    "train/response_length_mean", "train/truncated_frac", "train/kept_group_frac", "train/num_gen_batches",
    "train/grad_norm", "train/lr", "val/acc_avg_at_2", "val/pass_at_2", "rollout/logprob_abs_diff_mean",
    "time/rollout_s", "time/reward_s", "time/update_s",
]  # fmt: skip


def _fit(workdir: Path, qs: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val.path", str(qs / "data" / "val.jsonl"), "--data.val.limit", "8", "--data.val_rollout.n", "2",
        "--data.prompts_per_step", "4", "--data.rollout.n", "4", "--model.algorithm.mini_batch_size", "8",
        "--trainer.val_check_interval", "2", "--model.export_dir", str(workdir / "exported"), *extra,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'runs.db'}"}
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fit_logs_every_design_metric_and_resume_continues_the_run(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    import mlflow

    first = _fit(tmp_path, quickstart_dir, "--trainer.max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "validation at step 0" in first.stdout and "validation at step 4" in first.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    logged = set(run.data.metrics)
    assert not [m for m in DESIGN_METRICS if m not in logged], sorted(logged)
    history = client.get_metric_history(run.info.run_id, "train/grad_norm")
    # One point per rollout step, on the optimizer-step axis that trainer.max_steps counts (a rollout step makes
    # one or two updates here: 16 responses at most, mini-batches of 8, fewer when dynamic sampling runs short).
    steps = [m.step for m in sorted(history, key=lambda m: m.step)]
    assert steps == sorted(set(steps)) and steps[0] >= 1 and steps[-1] in (4, 5) and len(steps) <= 4
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc_avg_at_2"))
    assert val_steps[0] == 0 and len(val_steps) >= 2
    assert run.data.params["model.algorithm.eps_high"] == "0.28"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert (tmp_path / "exported" / "model.safetensors").exists()

    assert (tmp_path / "checkpoints" / "quickstart" / "last.ckpt").exists()  # written when fit ends
    second = _fit(tmp_path, quickstart_dir, "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # the same run continued
    resumed = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/grad_norm"))
    assert resumed[: len(steps)] == steps and resumed[-1] in (8, 9) and len(resumed) > len(steps)


@pytest.mark.slow
def test_fit_with_a_missing_answer_field_names_file_and_line(quickstart_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "solution": "4"}\n', encoding="utf-8"
    )
    result = _fit(tmp_path, quickstart_dir, "--trainer.max_steps", "1", "--data.train.path", str(bad))
    assert result.returncode != 0
    assert f"{bad}:2: no field 'answer'" in result.stderr

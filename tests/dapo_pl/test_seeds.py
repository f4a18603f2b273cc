"""Seeds: ``seed_everything`` drives every seed left null; an explicit seed wins; the resolved seeds are logged.

The end-to-end test runs the real CLI (``python -m dapo_pl fit``) on the quickstart's tiny model with an MLflow
sqlite store, three times: seed 1, seed 1 again, seed 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_pl.data import PromptDataConfig
from dapo_pl.datamodule import DAPODataModule, EngineConfig
from dapo_pl.engines import SamplingConfig
from dapo_pl.seeds import SEED_SPACE, derive_seed, global_seed, resolve_seed

REPO = Path(__file__).resolve().parents[2]


def test_derived_seeds_differ_by_global_seed_and_by_stream() -> None:
    seeds = {(b, s): derive_seed(b, s) for b in range(4) for s in ("data", "rollout", "validation", "engine")}
    assert len(set(seeds.values())) == len(seeds)  # no two (global seed, stream) pairs share a seed
    assert all(0 <= v < SEED_SPACE for v in seeds.values())
    assert derive_seed(3, "rollout") == derive_seed(3, "rollout")
    # Neighbouring global seeds must not give neighbouring rollout seeds (call i uses seed + i).
    assert abs(derive_seed(1, "rollout") - derive_seed(0, "rollout")) > 1000
    with pytest.raises(ValueError, match="unknown seed stream 'shuffle'"):
        derive_seed(0, "shuffle")


def test_explicit_seed_wins_and_null_follows_the_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert global_seed() == 7
    assert resolve_seed(None, "rollout") == derive_seed(7, "rollout")
    assert resolve_seed(5, "rollout") == 5
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert global_seed() == 0


def test_datamodule_resolves_its_seeds_from_seed_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    def dm(**kwargs: object) -> DAPODataModule:
        return DAPODataModule(train=PromptDataConfig("unused.jsonl"), **kwargs)  # type: ignore[arg-type]

    L.seed_everything(11)
    seeds = dm().resolved_seeds()
    assert seeds == {
        "seeds.global": 11,
        "seeds.data": derive_seed(11, "data"),
        "seeds.rollout": derive_seed(11, "rollout"),
        "seeds.validation": derive_seed(11, "validation"),
        "seeds.engine": derive_seed(11, "engine"),
    }
    explicit = dm(
        seed=3,
        rollout=SamplingConfig(seed=4),
        val_rollout=SamplingConfig(n=4, seed=5),
        engine=EngineConfig(name="vllm", options={"seed": 6}),
    ).resolved_seeds()
    assert [explicit[f"seeds.{k}"] for k in ("data", "rollout", "validation", "engine")] == [3, 4, 5, 6]
    L.seed_everything(12)
    assert dm().resolved_seeds()["seeds.rollout"] == derive_seed(12, "rollout")
    monkeypatch.delenv("PL_GLOBAL_SEED")


def _fit(workdir: Path, qs: Path, seed: int) -> dict[str, list[tuple[int, float]]]:
    """One short quickstart fit through the real CLI; returns its metric histories (timings left out)."""
    import mlflow

    workdir.mkdir()
    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--seed_everything", str(seed),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val.path", str(qs / "data" / "val.jsonl"), "--data.val.limit", "8", "--data.val_rollout.n", "2",
        "--data.prompts_per_step", "4", "--data.rollout.n", "4", "--model.algorithm.mini_batch_size", "16",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "[]", "--model.export_dir", "null",
    ]  # fmt: skip
    uri = f"sqlite:///{workdir / 'runs.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.data.params["seeds.global"] == str(seed)
    assert run.data.params["seeds.rollout"] == str(derive_seed(seed, "rollout"))
    assert run.data.params["seeds.validation"] == str(derive_seed(seed, "validation"))
    names = [m for m in run.data.metrics if m.startswith(("train/", "val/", "rollout/"))]
    return {
        m: sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, m)) for m in names
    }


@pytest.mark.slow
def test_same_seed_same_run_and_another_seed_other_rollouts(quickstart_dir: Path, tmp_path: Path) -> None:
    first = _fit(tmp_path / "a", quickstart_dir, 1)
    again = _fit(tmp_path / "b", quickstart_dir, 1)
    other = _fit(tmp_path / "c", quickstart_dir, 2)
    assert "train/reward_mean" in first and len(first["train/reward_mean"]) >= 2
    assert again == first  # bit-identical: every metric at every step, floats compared exactly
    assert other["train/reward_mean"] != first["train/reward_mean"]
    assert other["train/response_length_mean"] != first["train/response_length_mean"]

"""Non-finite losses: a NaN gradient (injected by a hook on a real parameter, in a real ``dapo-pl fit``) skips
the optimizer step: weights, optimizer state and schedule stay as they were, ``train/skipped_steps`` counts it;
``model.optim.max_skipped_steps`` in a row stop the fit with a clear error and exit 1.

Checked to fail: with ``_skip_non_finite`` returning False, the poisoned step moves the weights (to NaN).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

INJECTOR = '''
import json, os
import lightning as L
import torch


class PoisonGrad(L.Callback):
    """NaN into one parameter's gradient during the rollout steps listed in POISON (1-based); records, after every
    rollout step, a fingerprint of the weights, the optimizer's step count and the schedule's position."""

    def __init__(self):
        self.batch = 0
        self.poison = {int(s) for s in os.environ["POISON"].split(",")}
        self.out = open(os.environ["RECORD"], "w")

    def on_train_start(self, trainer, pl_module):
        param = next(pl_module.policy.parameters())
        param.register_hook(lambda g: g * float("nan") if self.batch in self.poison else g)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        opt = pl_module.optimizers().optimizer
        steps = [float(s["step"]) for s in opt.state.values()]
        record = {
            "batch": self.batch,
            "global_step": trainer.global_step,
            "weights": float(sum(p.double().abs().sum() for p in pl_module.policy.parameters())),
            "adam_steps": max(steps, default=0.0),
            "sched": pl_module.lr_schedulers().last_epoch,
        }
        self.out.write(json.dumps(record) + "\\n")
        self.out.flush()
'''


@pytest.mark.slow
def test_a_nan_gradient_skips_the_step_and_too_many_stop_the_fit(
    quickstart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from fit_runs import run_fit

    (tmp_path / "poison_grad.py").write_text(INJECTOR, encoding="utf-8")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
    monkeypatch.setenv("POISON", "2,3,4")
    monkeypatch.setenv("RECORD", str(record))
    result = run_fit(
        tmp_path, quickstart_dir, "--trainer.max_steps", "6", "--data.val.limit", "8",
        "--trainer.callbacks+=poison_grad.PoisonGrad", "--model.optim.max_skipped_steps", "3",
        "--data.dynamic_sampling.enabled", "false",  # every step trains: the poisoned ones are optimizer steps
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm" in result.stderr
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["batch"] for r in rows] == [1, 2, 3]  # the third poisoned step raised before its end hook
    first, *skipped = rows
    assert first["global_step"] == 1 and first["adam_steps"] == 1.0 and first["sched"] == 1
    for r in skipped:  # nothing moved
        assert (r["global_step"], r["adam_steps"], r["sched"]) == (1, 1.0, 1)
        assert r["weights"] == first["weights"] and math.isfinite(r["weights"])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    history = sorted(
        (m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")
    )
    assert [v for _, v in history] == [0.0, 1.0, 2.0]

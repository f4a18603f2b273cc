"""Each training step's metrics reach the loggers once, ``trainer.callback_metrics`` (callbacks and checkpoint
monitors) and the progress bar, with the same values: a real 3-step fit of the quickstart model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from dapo_pl.data import PromptDataConfig
from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig
from dapo_pl.engines import SamplingConfig
from dapo_pl.module import AlgorithmConfig, DAPOModule, OptimConfig


class ListLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


class Seen(Callback):
    def __init__(self) -> None:
        self.callback: list[dict[str, Any]] = []
        self.bar: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.callback.append(dict(trainer.callback_metrics))
        self.bar.append(dict(trainer.progress_bar_metrics))


def test_step_metrics_reach_loggers_callbacks_monitors_and_the_bar(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    qs = quickstart_dir
    dm = DAPODataModule(
        train=PromptDataConfig(str(qs / "data" / "train.jsonl")), model_name_or_path=str(qs / "model"),
        prompts_per_step=4, rollout=SamplingConfig(n=4, max_new_tokens=8),
        dynamic_sampling=DynamicSamplingConfig(enabled=False),
    )  # fmt: skip
    module = DAPOModule(
        str(qs / "model"), algorithm=AlgorithmConfig(mini_batch_size=16),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0),
    )  # fmt: skip
    seen, logger = Seen(), ListLogger()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/reward_mean", mode="max", save_top_k=1,
                           every_n_train_steps=1)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, max_epochs=-1, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[seen, best],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)

    steps = [(step, m) for step, m in logger.calls if "train/reward_mean" in m]
    assert [step for step, _ in steps] == [1, 2, 3]  # once per step, on the optimizer-step axis
    assert len(seen.callback) == 3
    for (_, logged), callback, bar in zip(steps, seen.callback, seen.bar, strict=True):
        assert set(logged) <= set(callback)
        for key, value in logged.items():
            # tensors of the default dtype, as Lightning's `self.log` stores them
            assert isinstance(callback[key], torch.Tensor) and callback[key] == torch.tensor(value), key
        assert bar["reward"] == logged["train/reward_mean"] and bar["acc"] == logged["train/acc"]
        assert bar["kept"] == logged["train/kept_group_frac"]
    rewards = [m["train/reward_mean"] for _, m in steps]
    assert best.best_model_score is not None and float(best.best_model_score) == max(rewards)
    assert Path(best.best_model_path).name.startswith(f"epoch=0-step={rewards.index(max(rewards)) + 1}")

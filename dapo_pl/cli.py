"""The ``dapo-pl`` command (also ``python -m dapo_pl``).

- ``dapo-pl fit|validate --config X.yaml ...``: LightningCLI over :class:`DAPOModule` and :class:`DAPODataModule`;
  every init argument is a YAML key and a flag, ``--print_config`` prints the resolved config.
- ``dapo-pl verifiers``: the discovered verifier plugins.
- ``dapo-pl verify``: score a jsonl file with verifiers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from dapo_pl.datamodule import DAPODataModule
from dapo_pl.module import DAPOModule
from dapo_pl.progress import DAPOProgressBar

PLUGIN_COMMANDS = ("verifiers", "verify", "compare")

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {"class_path": "dapo_pl.tracking.DAPOMLFlowLogger"},
    "log_every_n_steps": 1,
    "max_epochs": -1,
    "num_sanity_val_steps": -1,  # a full validation before the first update: the start of the val curve
    "check_val_every_n_epoch": None,
}


class DAPOCLI(LightningCLI):
    """LightningCLI with the model path shared between module and data, and MLflow run resumption."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.add_lightning_class_args(DAPOProgressBar, "progress_bar")

    def before_fit(self) -> None:
        self._resume_mlflow_run()
        self._log_config()

    def before_validate(self) -> None:
        self._log_config()

    def _resume_mlflow_run(self) -> None:
        """On ``--ckpt_path``, continue the MLflow run the checkpoint was written in (one run per fit)."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt_path or logger is None or not hasattr(logger, "_run_id") or logger._run_id is not None:
            return
        path = _resolve_ckpt(self.trainer, ckpt_path)
        if path is None:
            return
        run_id = torch.load(path, map_location="cpu", weights_only=False).get("mlflow_run_id")
        if run_id:
            logger._run_id = run_id

    def _log_config(self) -> None:
        logger = self.trainer.logger
        if logger is None:
            return
        config = self.config[self.subcommand]
        sections = ("model", "data", "trainer", "seed_everything")  # config.items() gives dotted leaf keys
        flat = _flatten({k: v for k, v in config.items() if k.split(".")[0] in sections})
        resolved = getattr(self.datamodule, "resolved_seeds", None)
        if callable(resolved):  # the seeds left null in the config, as derived from seed_everything
            flat.update(resolved())
        run_id = getattr(logger, "run_id", None)
        if run_id and hasattr(logger, "experiment"):  # a resumed run: MLflow refuses to change a logged param
            logged = logger.experiment.get_run(run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v)[:250])
            if changed:
                print(f"[dapo-pl] resumed MLflow run keeps its first values of {', '.join(changed)}")
                flat = {k: v for k, v in flat.items() if k not in changed}
        logger.log_hyperparams(flat)
        text = self._parser(self.subcommand).dump(config, skip_none=False)
        if run_id and hasattr(logger, "experiment"):
            logger.experiment.log_text(run_id, text, "config.yaml")


def _resolve_ckpt(trainer: Any, ckpt_path: str) -> str | None:
    """The file behind ``--ckpt_path`` (``last`` is looked up the way Lightning does, before fit starts)."""
    if ckpt_path == "last":
        candidates: set[str] = set()
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                candidates |= {str(p) for p in cb._find_last_checkpoints(trainer)}
        return max(candidates, key=lambda p: Path(p).stat().st_mtime) if candidates else None
    if ckpt_path in ("best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    if path.is_dir() and (path / "meta.pt").exists():  # distributed (sharded) checkpoint folder
        return str(path / "meta.pt")
    return ckpt_path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(tree, "items"):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def run_lightning(args: list[str] | None = None, run: bool = True) -> DAPOCLI:
    """Run the LightningCLI part (``fit``, ``validate``, ...) on ``args``; ``run=False`` only builds the objects."""
    return DAPOCLI(
        DAPOModule,
        DAPODataModule,
        save_config_callback=None,  # breaks with an sqlite MLflow logger; the config is logged as an artifact
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        parser_kwargs={"prog": "dapo-pl"},
        run=run,
    )


def _plugin_main(argv: list[str]) -> int:
    from dapo_pl import verify_cmd
    from dapo_pl.compare import add_compare_parser

    parser = argparse.ArgumentParser(prog="dapo-pl")
    sub = parser.add_subparsers(dest="command", required=True)
    verify_cmd.add_list_parser(sub)
    verify_cmd.add_verify_parser(sub)
    add_compare_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


# Lightning warnings that do not apply to this design (rollouts pulled through dataloader_iter on purpose,
# batches moved by the module, models loaded in eval mode and switched by the engine).
_KNOWN_WARNINGS = (
    r".*`dataloader_iter`",
    r".*overridden `transfer_batch_to_device`",
    r".*module\(s\) in eval mode",
    r".*LeafSpec",
    r".*does not have many workers",
    r".*Using ModelCheckpoint with manual optimization",  # the post-update state is the one we want saved
)


def main(argv: list[str] | None = None) -> int:
    import warnings

    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PLUGIN_COMMANDS:
        return _plugin_main(args)
    run_lightning(argv)  # None: LightningCLI reads sys.argv itself
    return 0

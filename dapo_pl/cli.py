"""The ``dapo-pl`` command (also ``python -m dapo_pl``).

- ``dapo-pl fit|validate --config X.yaml ...``: LightningCLI over :class:`DAPOModule` and :class:`DAPODataModule`;
  every init argument is a YAML key and a flag, ``--print_config`` prints the resolved config.
- ``dapo-pl verifiers``: the discovered verifier plugins.
- ``dapo-pl verify``: score a jsonl file with verifiers.
- ``dapo-pl mlflow-replay FILE``: send the metrics a fit could not deliver to its MLflow server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dapo_pl.checkpoint import (
    CheckpointWriteError,
    check_writable,
    find_resume_checkpoint,
    install_atomic_checkpoint_io,
)
from dapo_pl.datamodule import DAPODataModule
from dapo_pl.errors import (
    USER_ERROR_EXIT,
    ConfigError,
    DapoUserError,
    MissingPathError,
    debug_enabled,
    user_error_paragraph,
)
from dapo_pl.module import DAPOModule, NonFiniteLossError
from dapo_pl.preemption import PreemptedFit, PreemptionCallback, resume_hint
from dapo_pl.progress import DAPOProgressBar

PLUGIN_COMMANDS = ("verifiers", "verify", "compare", "mlflow-replay")

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {"class_path": "dapo_pl.tracking.DAPOMLFlowLogger"},
    "log_every_n_steps": 1,
    "max_epochs": -1,
    "num_sanity_val_steps": -1,  # a full validation before the first update: the start of the val curve
    "check_val_every_n_epoch": None,
    # The config is logged by DAPOCLI._log_config (dotted keys, a resumed run keeps its first values); Lightning's
    # own copy of the module's hparams would crash a resume whose flags changed one (MLflow refuses the change).
    "enable_autolog_hparams": False,
}


class DAPOCLI(LightningCLI):
    """LightningCLI with the model path shared between module and data, and MLflow run resumption."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.add_lightning_class_args(DAPOProgressBar, "progress_bar")

    def instantiate_classes(self) -> None:
        """Build the objects; a bad value raised while building one becomes a :class:`ConfigError` naming its key."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as exc:  # ours (ConfigError) included: add the key
            raise ConfigError(_with_key(_config_key(exc.__traceback__), str(exc))) from exc

    def before_fit(self) -> None:
        self._prepare_checkpoints()
        self._resume_mlflow_run()
        self._log_config()

    def _prepare_checkpoints(self) -> None:
        """Atomic checkpoint writes, writable folders (checked now, not at the first save), ``--ckpt_path`` made
        a verified file, and SIGTERM/SIGINT turned into "finish the step, save, stop" (docs/reliability.md)."""
        trainer: Any = self.trainer
        config = self.config_init[self.subcommand]
        install_atomic_checkpoint_io(trainer)
        for folder in _checkpoint_folders(trainer):
            check_writable(folder)
        if config.get("ckpt_path"):
            config["ckpt_path"] = _resolve_ckpt(trainer, config["ckpt_path"])
        if not any(isinstance(cb, PreemptionCallback) for cb in trainer.callbacks):
            first_ckpt = next(
                (i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)), None
            )
            trainer.callbacks.insert(
                len(trainer.callbacks) if first_ckpt is None else first_ckpt, PreemptionCallback()
            )

    def before_validate(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            config["ckpt_path"] = _resolve_ckpt(self.trainer, config["ckpt_path"])
        ckpt_path = config.get("ckpt_path")
        model = config.get("model")
        if ckpt_path:
            print(f"[dapo-pl] validate: scoring the checkpoint {ckpt_path}")
        else:
            source = getattr(model, "model_name_or_path", "?")
            print(f"[dapo-pl] validate: no --ckpt_path, scoring the weights in {source} as they are")
        self._log_config()

    def _resume_mlflow_run(self) -> None:
        """On ``--ckpt_path``, continue the MLflow run the checkpoint was written in (one run per fit)."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt_path or logger is None or not hasattr(logger, "_run_id") or logger._run_id is not None:
            return
        path = ckpt_path if ckpt_path not in ("best", "hpc", "registry") else None
        if path is None:
            return
        if Path(path).is_dir() and (Path(path) / "meta.pt").exists():  # a sharded checkpoint folder
            path = str(Path(path) / "meta.pt")
        run_id = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("mlflow_run_id")
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


def _checkpoint_folders(trainer: Any) -> list[str]:
    """The local folders the checkpoint callbacks write to (Lightning's default for one without a dirpath)."""
    folders = []
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        if "://" not in str(folder) and str(folder) not in folders:
            folders.append(str(folder))
    return folders


def _resolve_ckpt(trainer: Any, ckpt_path: str) -> str | None:
    """The file behind ``--ckpt_path``. ``last`` is the newest checkpoint in the checkpoint folders that opens
    (broken ones are skipped with a warning); None (start afresh) when there is none at all."""
    if ckpt_path == "last":
        folders = _checkpoint_folders(trainer)
        path, skipped = find_resume_checkpoint(folders)
        for bad, why in skipped:
            rank_zero_warn(f"--ckpt_path last: skipping {bad}, which cannot be loaded ({why})")
        if path is None and skipped:
            raise CheckpointWriteError(
                f"--ckpt_path last: no checkpoint in {', '.join(folders)} can be loaded (see the warnings above); "
                "move the broken files away to start afresh, or pass --ckpt_path FILE"
            )
        if path is None:
            rank_zero_info(
                f"[dapo-pl] --ckpt_path last: no checkpoint in {', '.join(folders)} yet; starting afresh"
            )
        elif skipped:
            rank_zero_warn(f"--ckpt_path last: resuming from {path}, the newest checkpoint that loads")
        return path
    return ckpt_path  # a file, a sharded checkpoint folder, or Lightning's "best", "hpc", "registry"


def _config_key(tb: TracebackType | None) -> str | None:
    """The config key (``data.rollout``) jsonargparse was building when the traceback ``tb`` was raised.

    jsonargparse builds each class group in ``group_instantiate_class`` (local ``group``) and each typed value in
    ``instantiate`` (local ``component``); both carry the key as ``dest``. The innermost one is the culprit.
    """
    key = None
    while tb is not None:
        for name in ("group", "component"):
            dest = getattr(tb.tb_frame.f_locals.get(name), "dest", None)
            if isinstance(dest, str) and dest:
                key = dest
        tb = tb.tb_next
    return key


def _with_key(key: str | None, message: str) -> str:
    """``message`` prefixed with the config ``key``, merged when it starts with the field's own name:
    ``("data.rollout", "max_new_tokens must be >= 1")`` -> ``"data.rollout.max_new_tokens must be >= 1"``."""
    if not key:
        return message
    parent, _, last = key.rpartition(".")
    if message.startswith(f"{last}."):
        return f"{parent}.{message}" if parent else message
    if re.match(r"[a-z_][a-z0-9_]* (must|\()", message):
        return f"{key}.{message}"
    return f"{key}: {message}"


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
    from dapo_pl.tracking import add_replay_parser

    parser = argparse.ArgumentParser(prog="dapo-pl")
    sub = parser.add_subparsers(dest="command", required=True)
    verify_cmd.add_list_parser(sub)
    verify_cmd.add_verify_parser(sub)
    add_compare_parser(sub)
    add_replay_parser(sub)
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


def _config_files(args: list[str]) -> list[str]:
    """The values of every ``--config``/``-c`` option in ``args``."""
    out = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.partition("=")[2])
    return out


def check_config_files(args: list[str]) -> None:
    """Each ``--config`` file exists and is valid YAML; a syntax error names the file, line and column.

    (jsonargparse reads the text first, so its own message says ``"<unicode string>"`` instead of the file.)
    A value that is not a path to a ``.yaml``/``.yml``/``.json`` file (jsonargparse also takes inline YAML) is
    left to jsonargparse.
    """
    import yaml

    for value in _config_files(args):
        path = Path(value)
        if not path.exists():
            if path.suffix.lower() in (".yaml", ".yml", ".json"):
                raise MissingPathError(f"--config {value}: no such file")
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{value}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{value}, line {mark.line + 1}, column {mark.column + 1}" if mark else value
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: YAML syntax error: {problem}") from exc


def _run(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PLUGIN_COMMANDS:
        return _plugin_main(args)
    check_config_files(args)
    try:
        run_lightning(argv)  # None: LightningCLI reads sys.argv itself (an unreachable MLflow: DapoUserError)
    except PreemptedFit as exc:
        print(resume_hint(exc, args), file=sys.stderr)
        return 128 + exc.signum
    except SIGTERMException:  # Lightning's own SIGTERM handling, before training started (e.g. set-up)
        print(
            "[dapo-pl] stopped by SIGTERM before training started; run the same command again",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except (CheckpointWriteError, NonFiniteLossError) as exc:
        print(f"[dapo-pl] error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``dapo-pl`` command. A :class:`~dapo_pl.errors.DapoUserError` (bad configuration or data) is printed
    as one paragraph without a traceback and gives exit status 2 (``DAPO_PL_DEBUG=1``: with the traceback);
    any other exception keeps its traceback."""
    import warnings

    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        return _run(argv)
    except DapoUserError as exc:
        if debug_enabled():
            raise
        sys.stdout.flush()
        print(user_error_paragraph(exc), file=sys.stderr)
        return USER_ERROR_EXIT

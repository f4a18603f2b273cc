"""Every YAML under configs/ is built through the real CLI, and each opens with its header comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dapo_pl.cli import main, run_lightning
from dapo_pl.datamodule import DAPODataModule
from dapo_pl.module import DAPOModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _stack(path: Path) -> list[Path]:
    """The configs the header's ``dapo-pl fit`` command stacks when ``path`` is an overlay (e.g.
    ``--config configs/quickstart.yaml --config configs/lora_quickstart.yaml``), else ``[path]``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        stacked = re.findall(r"--config\s+(\S+)", line)
        if "dapo-pl fit" in line and len(stacked) > 1 and path == REPO / stacked[-1]:
            return [REPO / p for p in stacked]
    return [path]


def test_there_are_configs() -> None:
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds_through_the_cli(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_lightning([arg for p in _stack(path) for arg in ("--config", str(p))], run=False)
    assert isinstance(cli.model, DAPOModule) and isinstance(cli.datamodule, DAPODataModule)
    assert cli.datamodule.model_name_or_path == cli.model.model_name_or_path  # linked, written once
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_opens_with_a_header(path: Path) -> None:
    """What it runs, the command, the hardware and the expected time, before any key."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lower())
    text = "\n".join(header)
    assert "dapo-pl" in text or "make " in text, f"{path}: header names no command"
    assert "hardware" in text, f"{path}: header names no hardware"
    assert "time" in text, f"{path}: header gives no expected time"


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    path = next(p for p in CONFIGS if p.name == "quickstart.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "eps_high: 0.28" in out and "model_name_or_path: artifacts/quickstart/model" in out


def test_bad_values_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = next(p for p in CONFIGS if p.name == "quickstart.yaml")
    with pytest.raises((ValueError, SystemExit)) as exc:
        run_lightning(["--config", str(path), "--model.algorithm.eps_low", "-0.1"], run=False)
    assert "eps_low" in str(exc.value) or exc.type is SystemExit

"""Shared fixtures: fixed seeds for every test, and a tiny local model + data built once per session."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    torch.manual_seed(0)


def load_tool(name: str):  # type: ignore[no-untyped-def]
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dapo_tools_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's model and data, with a very short warm start (enough to emit the format sometimes)."""
    out = tmp_path_factory.mktemp("quickstart")
    load_tool("make_quickstart").build(out, sft_steps=60, seed=0)
    return out

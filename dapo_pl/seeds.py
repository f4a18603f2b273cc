"""Where a run's seeds come from: one global seed (``seed_everything``) unless a seed is set explicitly.

``seed_everything N`` (the CLI sets it before building anything; ``lightning.seed_everything`` records it in
``PL_GLOBAL_SEED``) seeds torch, numpy and Python, and every seed of dapo-pl that is left ``null`` is derived from
it: the prompt shuffle (``data.seed``), the training rollouts (``data.rollout.seed``), validation sampling
(``data.val_rollout.seed``) and the vLLM engine's own seed (``data.engine.options.seed``). A value set explicitly
wins. So ``--seed_everything 1`` and ``--seed_everything 2`` sample different rollouts and shuffle the prompts
differently, and the same global seed twice gives the same run. The resolved values are logged as MLflow params
(``seeds.*``).

Derived seeds are a hash of the global seed and the stream's name, so the streams do not collide with one another
or with the global seed's neighbours (rollout call ``i`` uses ``rollout seed + i``; with seeds ``0, 1, 2, ...``
and offsets, seed 1's rollouts would otherwise replay seed 0's shifted by one call).
"""

from __future__ import annotations

import hashlib
import os

STREAMS = ("data", "rollout", "validation", "engine")
SEED_SPACE = 2**31  # vLLM and numpy take 32-bit seeds; per-call offsets are added on top


def global_seed() -> int:
    """The seed ``seed_everything`` set in this process (``PL_GLOBAL_SEED``), or 0 when none was set."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else 0


def derive_seed(base: int, stream: str) -> int:
    """A seed in ``[0, 2**31)`` for ``stream`` from the global seed ``base``: the same pair, the same seed.

    E.g. ``derive_seed(0, "rollout") != derive_seed(1, "rollout") != derive_seed(0, "validation")``.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; choose one of {', '.join(STREAMS)}")
    digest = hashlib.sha256(f"dapo-pl:{int(base)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_SPACE


def resolve_seed(explicit: int | None, stream: str, base: int | None = None) -> int:
    """``explicit`` when set, else the seed of ``stream`` derived from ``base`` (default: :func:`global_seed`)."""
    if explicit is not None:
        return int(explicit)
    return derive_seed(global_seed() if base is None else base, stream)

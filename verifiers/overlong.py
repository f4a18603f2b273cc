"""Built-in verifier ``overlong``: DAPO's overlong reward shaping (soft overlong punishment, Eq. 13).

A pure shaping term (``correct`` is None): its reward is added to the correctness reward. The length is the
response length in tokens and ``max_len`` defaults to the rollout's ``max_new_tokens`` (``L_max``), so only
``cache_len`` (``L_cache``) and ``factor`` are usually configured. The formula lives in
:func:`dapo_pl.objective.overlong_penalty`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dapo_pl.hookspecs import hookimpl
from dapo_pl.objective import overlong_penalty
from dapo_pl.verification import Sample, Verdict


class Overlong:
    """Soft overlong punishment (DAPO Eq. 13): 0 up to L_max - L_cache, then linear down to -factor."""

    def __init__(self, cache_len: int, factor: float = 1.0, max_len: int | None = None) -> None:
        if max_len is not None:
            overlong_penalty(torch.zeros(1), max_len, cache_len, factor)  # validates eagerly
        elif cache_len < 0:
            raise ValueError(f"cache_len must be >= 0, got {cache_len}")
        self.cache_len = cache_len
        self.factor = factor
        self.max_len = max_len

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = []
        for s in samples:
            max_len = self.max_len if self.max_len is not None else s.max_response_length
            if max_len is None:
                verdicts.append(Verdict(0.0, None, None, "overlong: no max_len configured or known"))
                continue
            penalty = overlong_penalty(
                torch.tensor([s.response_length]), max_len, self.cache_len, self.factor
            )
            verdicts.append(Verdict(float(penalty[0]), None, None, None))
        return verdicts


@hookimpl
def register_verifiers(register):  # type: ignore[no-untyped-def]
    register("overlong", Overlong)

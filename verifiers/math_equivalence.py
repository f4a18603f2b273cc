"""Built-in verifier ``math_equivalence``: is the response's final answer mathematically equal to the reference?

The correctness reward of DAPO (+1 right, -1 wrong). The final answer is the last ``\\boxed{}``/``\\fbox``
or ``Answer:`` line (else a clear final sentence); it is compared with the reference by exact arithmetic
first (most RL answers are integers or fractions, decided in this process in microseconds), then
symbolically with sympy in worker processes that are killed past ``timeout_s``. Hedges (``3 or 4``,
``\\pm``), several different final answers, unevaluated copies of the problem (``\\sum``, ``\\int``...),
floods of boxes and oversized inputs are all wrong. Model output is never passed to ``eval``, ``sympify`` or
``parse_value``. The machinery lives in :mod:`dapo_pl_verifiers.math`.

YAML (the correctness verifier of a training config)::

    data:
      reward:
        correctness: {name: math_equivalence, options: {timeout_s: 1.0, num_workers: 2}}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import Sample, Verdict

from .math.grade import Limits, Outcome, Task, prepare
from .math.pool import CRASHED, TIMEOUT, Result, WorkerPool, default_workers

_TASK_CACHE = 16_384


class MathEquivalence:
    """Math answer equivalence (boxed or Answer: line), exact then symbolic, hack-resistant, time-limited."""

    def __init__(
        self,
        correct_reward: float = 1.0,
        incorrect_reward: float = -1.0,
        timeout_s: float = 1.0,
        num_workers: int | None = None,
        max_response_chars: int = 200_000,
        max_answer_chars: int = 1_000,
        max_boxes: int = 20,
        max_distinct_answers: int = 3,
        worker_memory_mb: int | None = 2048,
        start_method: str | None = None,
    ) -> None:
        """
        Args:
            correct_reward: reward of a correct response.
            incorrect_reward: reward of a wrong, unanswered, hacked, timed-out or unjudgeable response.
            timeout_s: hard wall-clock limit per response in the symbolic stage (the worker is killed past it).
            num_workers: worker processes for the symbolic stage; default min(2, CPUs).
            max_response_chars: longer responses are wrong without being read.
            max_answer_chars: longer final answers are wrong without being parsed.
            max_boxes: more ``\\boxed`` than this in one response is reward hacking.
            max_distinct_answers: more different final answers than this in one response is reward hacking.
            worker_memory_mb: address-space cap of each worker (None: no cap).
            start_method: ``forkserver`` (default where available) or ``spawn``.
        """
        if not 0 < timeout_s <= 60:
            raise ValueError(f"timeout_s must be in (0, 60], got {timeout_s}")
        for name, value in (
            ("max_response_chars", max_response_chars),
            ("max_answer_chars", max_answer_chars),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.correct_reward = float(correct_reward)
        self.incorrect_reward = float(incorrect_reward)
        self.limits = Limits(max_response_chars, max_answer_chars, max_boxes, max_distinct_answers)
        self.pool = WorkerPool(
            "dapo_pl_verifiers.math.grade:judge",
            default_workers() if num_workers is None else num_workers,
            timeout_s,
            start_method=start_method,
            preload=["dapo_pl_verifiers.math.worker"],
            memory_mb=worker_memory_mb,
        )
        self._cache: OrderedDict[Task, tuple[bool, str | None]] = OrderedDict()

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        outcomes = [self._prepare(s) for s in samples]
        self._judge({o.task for o in outcomes if o.task is not None and o.task not in self._cache})
        return [self._verdict(o) for o in outcomes]

    def close(self) -> None:
        """Stop the worker processes (also happens at interpreter exit)."""
        self.pool.close()

    def warm_up(self) -> None:
        """Start the workers and wait until they serve (benchmarks call this before timing)."""
        task = prepare(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", self.limits).task
        self.pool.map([task] if task is not None else [])

    def _prepare(self, sample: Sample) -> Outcome:
        if not isinstance(sample.response, str):
            return Outcome(False, error=f"response is {type(sample.response).__name__}, not text")
        try:
            return prepare(sample.response, sample.reference, self.limits)
        except Exception as exc:  # a bug here must not stop training: the sample is wrong, and says why
            return Outcome(False, error=f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    def _judge(self, tasks: set[Task]) -> None:
        if not tasks:
            return
        ordered = list(tasks)
        for task, result in zip(ordered, self.pool.map(ordered), strict=True):
            self._cache[task] = _interpret(result)
            if len(self._cache) > _TASK_CACHE:
                self._cache.popitem(last=False)

    def _verdict(self, o: Outcome) -> Verdict:
        correct, error = o.correct, o.error
        if o.task is not None:
            correct, error = self._cache.get(o.task, (False, "internal error: result lost"))
        reward = self.correct_reward if correct else self.incorrect_reward
        return Verdict(reward, bool(correct), o.extracted, error)


def _interpret(result: Result) -> tuple[bool, str | None]:
    if result.status == "ok":
        return result.value  # type: ignore[no-any-return]
    if result.status == TIMEOUT:
        return False, f"timed out: {result.message}"
    if result.status == CRASHED:
        return False, f"verifier worker crashed: {result.message}"
    return False, f"verifier error: {result.message}"


@hookimpl
def register_verifiers(register):  # type: ignore[no-untyped-def]
    register("math_equivalence", MathEquivalence)

"""The worker pool: hard per-task deadlines, killed and replaced workers, crashes, memory caps, shutdown."""

from __future__ import annotations

import os
import time

import pytest
from dapo_pl_verifiers.math.pool import CRASHED, TIMEOUT, WorkerPool, default_workers


@pytest.fixture()
def sleeper():  # type: ignore[no-untyped-def]
    pool = WorkerPool("time:sleep", num_workers=2, timeout_s=0.5)
    yield pool
    pool.close()


def test_overrun_kills_the_worker_and_the_pool_keeps_serving(sleeper: WorkerPool) -> None:
    sleeper.map([0])  # started and warm
    start = time.perf_counter()
    results = sleeper.map([0.01, 30, 0.01, 30, 0.01])
    elapsed = time.perf_counter() - start
    assert [r.status for r in results] == ["ok", TIMEOUT, "ok", TIMEOUT, "ok"]
    assert elapsed < 3.0  # two 0.5 s deadlines on two workers, not 60 s
    assert sleeper.replaced == 2
    assert [r.status for r in sleeper.map([0.01] * 4)] == ["ok"] * 4


def test_killed_workers_are_really_gone(sleeper: WorkerPool) -> None:
    sleeper.map([0])
    before = set(sleeper.pids)
    sleeper.map([30, 30])
    assert not before & set(sleeper.pids)
    time.sleep(0.2)
    for pid in before:
        with pytest.raises(OSError):
            os.kill(pid, 0)


def test_a_crash_is_reported_and_replaced() -> None:
    pool = WorkerPool("os:_exit", num_workers=1, timeout_s=5)
    try:
        results = pool.map([3, 4])
        assert [r.status for r in results] == [CRASHED, CRASHED]
        assert "exit code 3" in results[0].message
        assert pool.replaced == 2
    finally:
        pool.close()


def test_exceptions_are_results_not_raised() -> None:
    pool = WorkerPool("math:sqrt", num_workers=1, timeout_s=5)
    try:
        ok, bad = pool.map([4.0, -1.0])
        assert ok.status == "ok" and ok.value == 2.0
        assert bad.status == "error" and "ValueError" in bad.message
    finally:
        pool.close()


def test_memory_is_capped_per_worker() -> None:
    pool = WorkerPool("builtins:bytearray", num_workers=1, timeout_s=10, memory_mb=1024)
    try:
        big, small = pool.map([4 * 1024**3, 10])
        assert big.status == "error" and "MemoryError" in big.message
        assert small.status == "ok" and small.value == bytearray(10)
    finally:
        pool.close()


def test_close_is_idempotent_and_final() -> None:
    pool = WorkerPool("time:sleep", num_workers=1, timeout_s=1)
    pool.map([0])
    pids = pool.pids
    pool.close()
    pool.close()
    assert pool.pids == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.map([0])
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(OSError):
            os.kill(pid, 0)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        WorkerPool("time:sleep", num_workers=0, timeout_s=1)
    with pytest.raises(ValueError):
        WorkerPool("time:sleep", num_workers=1, timeout_s=0)
    assert 1 <= default_workers() <= 2


@pytest.mark.slow
def test_spawn_start_method_works_too() -> None:
    pool = WorkerPool("time:sleep", num_workers=1, timeout_s=20, start_method="spawn")
    try:
        assert [r.status for r in pool.map([0, 0])] == ["ok", "ok"]
    finally:
        pool.close()

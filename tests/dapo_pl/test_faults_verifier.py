"""Verifiers that hang or raise: a per-batch time limit, the batch's responses count as wrong with ``error``, a
``reward/errors`` metric, and a fit that stops past ``data.reward.max_error_frac`` naming the plugin.

The misbehaving verifiers are plugins registered in the test (by hand, in the process that runs them: in-process
for ``dapo-pl verify``, in a small driver script for ``dapo-pl fit`` subprocesses). Their "hang" waits on an event
(released at the end of the test) or sleeps far past the limit; nothing is faked around them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dapo_pl.cli import main
from dapo_pl.hookspecs import hookimpl
from dapo_pl.rewards import RewardConfig, RewardFunction, VerifierSpec
from dapo_pl.verification import (
    PLUGINS_ENV,
    Sample,
    Verdict,
    VerifierError,
    VerifierTimeout,
    build_verifier,
    get_plugin_manager,
    reset_plugin_manager,
)

REPO = Path(__file__).resolve().parents[2]


class Flaky:
    """Judges like an exact match of the whole response, except on call number ``on_call`` (1-based; 0: every
    call), where it hangs (until ``release`` or for ``hang_s``) or raises."""

    def __init__(self, mode: str, on_call: int, hang_s: float, release: threading.Event) -> None:
        self.mode, self.on_call, self.hang_s, self.release, self.calls = mode, on_call, hang_s, release, 0

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        self.calls += 1
        if self.on_call in (0, self.calls):
            if self.mode == "hang":
                self.release.wait(self.hang_s)
            else:
                raise ZeroDivisionError("the plugin divided by zero")
        return [
            Verdict(1.0 if s.response == s.reference else -1.0, s.response == s.reference) for s in samples
        ]


class _Plugin:
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    @hookimpl
    def register_verifiers(self, register: Any) -> None:
        register(
            "flaky",
            lambda mode="hang", on_call=2, hang_s=120.0: Flaky(mode, on_call, hang_s, self.release),
            "test verifier",
        )


@pytest.fixture()
def release(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The ``flaky`` verifier registered in the process-wide plugin manager; its hangs end with the test."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_plugin_manager()
    event = threading.Event()
    get_plugin_manager().register(_Plugin(event), name="flaky-plugin")
    yield event
    event.set()
    reset_plugin_manager()


def test_a_hung_call_times_out_and_the_next_waits_for_it(release: threading.Event) -> None:
    verifier = build_verifier("flaky", {"mode": "hang", "on_call": 1}, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(
        VerifierTimeout, match=r"verifier 'flaky' \(plugin flaky-plugin\) timed out after 0.5 s"
    ):
        verifier([Sample("1", "1")])
    # still stuck: the next call waits its own limit for the abandoned one, then fails without a second thread
    with pytest.raises(VerifierTimeout, match="still stuck in an earlier batch"):
        verifier([Sample("1", "1")])
    assert 0.9 < time.monotonic() - t0 < 5
    assert sum(t.name == "verifier-flaky" for t in threading.enumerate()) == 1
    release.set()  # the plugin returns: the verifier works again
    assert verifier([Sample("1", "1"), Sample("2", "1")]) == [Verdict(1.0, True), Verdict(-1.0, False)]


def test_a_raising_plugin_is_named_and_guarded(release: threading.Event) -> None:
    verifier = build_verifier("flaky", {"mode": "raise", "on_call": 0})
    with pytest.raises(
        VerifierError, match=r"verifier 'flaky' \(plugin flaky-plugin\) raised ZeroDivisionError"
    ):
        verifier([Sample("1", "1")])
    verdicts, error = verifier.score([Sample("1", "1")] * 2, Verdict(-1.0, False))
    assert error is not None and "ZeroDivisionError: the plugin divided by zero" in error
    assert verdicts == [Verdict(-1.0, False, None, error)] * 2


def test_reward_function_counts_errors_and_stops_past_the_share(
    release: threading.Event, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calls 1-4 of 4 samples each; call 2 raises. After call 2: 4 failed of 8 (0.5); 4 of 16 (0.25) after 4."""
    cfg = RewardConfig(VerifierSpec("flaky", {"mode": "raise", "on_call": 2}), max_error_frac=0.5)
    fn = RewardFunction(cfg)
    batch = [Sample("1", "1"), Sample("2", "1"), Sample("1", "1"), Sample("3", "3")]
    assert [s.correct for s in fn(batch)] == [True, False, True, True]
    failed = fn(batch)  # 4 of 8 failed: 0.5 is not more than 0.5, so it goes on
    assert [(s.reward, s.correct) for s in failed] == [(-1.0, False)] * 4
    assert all(s.error and "plugin flaky-plugin" in s.error for s in failed)
    assert "count as wrong" in capsys.readouterr().out
    fn(batch), fn(batch)
    assert fn.errors == {"verifier 'flaky' (plugin flaky-plugin)": 4} and fn.num_scored == 16

    strict = RewardFunction(
        RewardConfig(VerifierSpec("flaky", {"mode": "raise", "on_call": 2}), max_error_frac=0.4)
    )
    strict(batch)
    with pytest.raises(
        VerifierError, match=r"'flaky' \(plugin flaky-plugin\) failed on 4 of the 8 responses"
    ):
        strict(batch)


@pytest.mark.parametrize(
    ("mode", "message"), [("hang", "timed out after 1 s"), ("raise", "ZeroDivisionError")]
)
def test_verify_writes_every_line_in_order_with_the_error(
    release: threading.Event, tmp_path: Path, mode: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batches of 3 lines; the second batch hangs 1.5 s (limit 1 s) or raises. The third batch's call first
    waits for the abandoned one (which returns at 1.5 s), then goes through."""
    rows = [{"response": str(i % 3), "reference": "1", "id": i} for i in range(7)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["verify", "--verifier", "flaky", "--options", f'flaky={{"mode": "{mode}", "hang_s": 1.5}}', "--input", str(src),
            "--output", str(dst), "--batch-size", "3", "--timeout-s", "1"]  # fmt: skip
    t0 = time.monotonic()
    assert main(args) == 0
    assert time.monotonic() - t0 < 20
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(7))  # one line per input line, in order
    for o in out:
        if o["id"] in (3, 4, 5):  # the second batch of 3
            assert message in o["error"] and "verifier 'flaky' (plugin flaky-plugin)" in o["error"]
            assert (o["correct"], o["reward"]) == (False, -1.0)
        else:
            assert o["error"] is None and o["correct"] == (o["response"] == "1")
    assert "lines with an error: 3" in capsys.readouterr().err


# ---------------------------------------------------------------- through real fits

_DRIVER = """
import sys, time
from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import Verdict, get_plugin_manager

class Flaky:
    def __init__(self, mode, on_call):
        self.mode, self.on_call, self.calls = mode, on_call, 0
    def __call__(self, samples):
        self.calls += 1
        if self.on_call in (0, self.calls):
            if self.mode != "hang":
                raise ZeroDivisionError("the plugin divided by zero")
            time.sleep(5)  # past the 3 s limit; the next call waits for it (within its own 3 s)
        return [Verdict(0.0, len(s.response) % 2 == 0) for s in samples]  # mixed groups: steps train

class Plugin:
    @hookimpl
    def register_verifiers(self, register):
        register("flaky", lambda mode="hang", on_call=2: Flaky(mode, on_call), "test verifier")

get_plugin_manager().register(Plugin(), name="flaky-plugin")
if __name__ == "__main__":
    from dapo_pl.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _fit(tmp_path: Path, qs: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    args = [
        sys.executable, str(driver), "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(qs / "model"), "--data.train.path", str(qs / "data" / "train.jsonl"),
        "--data.val", "null", "--data.prompts_per_step", "4", "--data.rollout.n", "4",
        "--model.algorithm.mini_batch_size", "16", "--trainer.max_steps", "3", "--trainer.enable_checkpointing",
        "false", "--trainer.callbacks", "[]", "--model.export_dir", "null", "--data.reward.correctness.name", "flaky",
        "--data.dynamic_sampling.enabled", "false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs.db'}"}
    t0 = time.monotonic()
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return result, time.monotonic() - t0


def _run(tmp_path: Path) -> Any:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    return client, run


@pytest.mark.slow
def test_fit_survives_a_hung_batch_and_logs_reward_errors(quickstart_dir: Path, tmp_path: Path) -> None:
    """Three steps of one 16-response batch each; the verifier hangs on the second (limit 3 s): that step's 16
    responses count as wrong, `reward/errors` reads 0, 16, 0, and 16 of 48 (1/3) stays under max_error_frac 0.5."""
    result, _ = _fit(
        tmp_path, quickstart_dir, "--data.reward.timeout_s", "3",
        "--data.reward.max_error_frac", "0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verifier 'flaky' (plugin flaky-plugin) timed out after 3 s" in result.stdout
    client, run = _run(tmp_path)
    errors = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/errors"))
    assert [v for _, v in errors] == [0.0, 16.0, 0.0]
    acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/acc")}
    assert acc[errors[1][0]] == 0.0  # the hung batch counted as wrong
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_fit_stops_naming_the_plugin_past_max_error_frac(quickstart_dir: Path, tmp_path: Path) -> None:
    result, seconds = _fit(
        tmp_path, quickstart_dir, "--data.reward.correctness.options", '{"mode": "raise", "on_call": 2}',
        "--data.reward.max_error_frac", "0.3",
    )  # fmt: skip
    assert result.returncode != 0
    tail = result.stderr[-3000:]
    assert "verifier 'flaky' (plugin flaky-plugin) failed on 16 of the 32 responses" in tail, tail
    assert "ZeroDivisionError: the plugin divided by zero" in tail and "max_error_frac=0.3" in tail
    _, run = _run(tmp_path)
    assert run.info.status == "FAILED"

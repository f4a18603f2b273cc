"""Real ``dapo-pl fit`` subprocesses on the shipped quickstart settings, for the resume and preemption tests.

The settings are ``configs/quickstart.yaml`` as shipped (16 prompts x 8 responses per step, generation batches of
16 prompts, one mini-batch of the 128 responses, dynamic sampling with carry-over, overlong shaping, validation
on, the transformers engine). Departures, to keep the tests short:

- a shorter horizon: ``MAX_STEPS`` steps, validation and a checkpoint every ``EVERY`` steps, 32 validation prompts;
- the model of :func:`build_model` has ``SFT_STEPS`` (500) supervised warm-up steps instead of 1600 (it builds in
  about a minute, a third of the shipped build). Its answers are right about 10% of the time at T=1 and **about
  40% of its groups have mixed answers** (measured over 256 training prompts x 8 samples), so a step needs 2-4
  generation batches of 16 prompts to keep its 16 groups and the last one usually overshoots: surplus groups
  were carried over after about 3 steps in 4 (measured over ``seed_everything`` 0-5; the first step that trained
  on carried-over groups was step 2 or 3 in each). With 250 warm-up steps only ~12% of groups are mixed: on
  these settings 4 generation batches would rarely keep 16 groups, and nothing would be carried over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 6
EVERY = 2
SFT_STEPS = 500
# Wall-clock metrics differ between any two runs; system metrics are sampled by a clock.
CLOCK_METRICS = ("time/", "system/")
_REFERENCE: dict[str, Path] = {}


def build_model(root: Path) -> Path:
    """The quickstart model with enough supervised warm-up (``SFT_STEPS``) that most groups have mixed answers,
    so surplus groups are carried over in most steps (the shared ``quickstart_dir`` model is right too rarely)."""
    from tool_loading import load_tool

    out = root / "quickstart_resume"
    load_tool("make_quickstart").build(out, sft_steps=SFT_STEPS, seed=0)
    return out


@pytest.fixture(scope="session")
def resume_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model of :func:`build_model`, built once per session in its base folder."""
    return build_model(tmp_path_factory.getbasetemp())


def fit_args(
    workdir: Path, qs: Path, *extra: str, ckpt_dir: str = "checkpoints", ckpt_every: int = EVERY
) -> list[str]:
    # save_top_k -1 keeps every checkpoint (Lightning's default 1 removes the previous one at each save).
    extra_yaml = workdir / "checkpoints.yaml"
    extra_yaml.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: '{ckpt_dir}', every_n_train_steps: {ckpt_every}, save_last: true, "
        "save_top_k: -1}\n",
        encoding="utf-8",
    )
    return [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--config", str(extra_yaml), "--model.model_name_or_path", str(qs / "model"),
        "--data.train.path", str(qs / "data" / "train.jsonl"), "--data.val.path", str(qs / "data" / "val.jsonl"),
        "--data.val.limit", "32", "--trainer.max_steps", str(MAX_STEPS), "--trainer.val_check_interval", str(EVERY),
        "--model.export_dir", str(workdir / "exported"), *extra,
    ]  # fmt: skip


def env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'runs.db'}",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def run_fit(
    workdir: Path, qs: Path, *extra: str, ckpt_dir: str = "checkpoints", ckpt_every: int = EVERY
) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        fit_args(workdir, qs, *extra, ckpt_dir=ckpt_dir, ckpt_every=ckpt_every),
        cwd=workdir,
        env=env(workdir),
        capture_output=True,
        text=True,
        timeout=900,
    )


def start_fit(workdir: Path, qs: Path, *extra: str, ckpt_every: int = EVERY) -> subprocess.Popen[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        fit_args(workdir, qs, *extra, ckpt_every=ckpt_every), cwd=workdir, env=env(workdir), text=True,
        stdout=open(workdir / "stdout.txt", "w"), stderr=open(workdir / "stderr.txt", "w"),  # noqa: SIM115
    )  # fmt: skip


def reference_run(root: Path, qs: Path) -> Path:
    """The uninterrupted fit (run once per session, shared by the tests)."""
    if "dir" not in _REFERENCE:
        workdir = root / "uninterrupted"
        result = run_fit(workdir, qs)
        assert result.returncode == 0, result.stderr[-3000:]
        _REFERENCE["dir"] = workdir
    return _REFERENCE["dir"]


def mlflow_client(workdir: Path) -> Any:
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{workdir / 'runs.db'}")


def the_run(workdir: Path) -> Any:
    client = mlflow_client(workdir)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert len(runs) == 1, f"expected one MLflow run, got {len(runs)}"
    return runs[0]


def histories(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every non-clock metric as ``dapo-pl compare`` reads it: the last value logged at each step."""
    from dapo_pl.compare import curve

    client, run = mlflow_client(workdir), the_run(workdir)
    return {
        key: curve(client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if not key.startswith(CLOCK_METRICS)
    }


def raw_steps(workdir: Path, key: str) -> list[int]:
    client, run = mlflow_client(workdir), the_run(workdir)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def logged_step(workdir: Path) -> int:
    """The highest step of a rollout step's metrics so far (-1 before the first), read while the fit runs."""
    try:
        return max(raw_steps(workdir, "train/num_gen_batches"), default=-1)
    except Exception:  # the database or the run may not exist yet
        return -1


def wait_until(
    proc: subprocess.Popen[str], workdir: Path, done: Callable[[], bool], what: str, timeout: float = 600
) -> None:
    """Block until ``done()``, asserting that the fit is still running meanwhile."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, (workdir / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.2)


def wait_for_step(proc: subprocess.Popen[str], workdir: Path, step: int, timeout: float = 600) -> None:
    """Block until the fit has logged a rollout step at ``step`` or beyond (and is still running)."""
    wait_until(proc, workdir, lambda: logged_step(workdir) >= step, f"step {step}", timeout)


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def assert_same_after(reference: Path, resumed: Path, after: int) -> int:
    """Every metric at every step > ``after`` and the final weights are identical; returns the points compared."""
    from safetensors.torch import load_file

    ref, res = histories(reference), histories(resumed)
    assert set(ref) == set(res)
    compared = 0
    for key in sorted(ref):
        want = [(s, repr(v)) for s, v in ref[key] if s > after]  # repr: exact, and NaN equals NaN
        got = [(s, repr(v)) for s, v in res[key] if s > after]
        assert got == want, f"{key} after step {after}: {got} != {want}"
        compared += len(want)
    w_ref = load_file(reference / "exported" / "model.safetensors")
    w_res = load_file(resumed / "exported" / "model.safetensors")
    assert w_ref.keys() == w_res.keys()
    for name in w_ref:
        assert torch.equal(w_ref[name], w_res[name]), name
    return compared

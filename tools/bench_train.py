"""Training-step benchmark: seconds per DAPO step, split by phase, against TRL's GRPOTrainer; and a memory sweep.

What it does
    Speed mode (default). For each model (``tiny``: Qwen2 2 layers, hidden 128, 4 heads, 2 KV heads, intermediate
    256; ``9.5m``: 6 layers, hidden 384, 6 heads, 2 KV heads, intermediate 1024; both tied embeddings, randomly
    initialised, the quickstart's byte vocabulary of 259 tokens) and each runner (``ours-transformers``,
    ``ours-vllm`` and, with ``--peer trl``, ``trl``: TRL's ``GRPOTrainer``), it trains a short and a long run, each
    in a fresh process, interleaved (ours-short, trl-short, ours-long, trl-long; ``--repeats`` times), so that
    all runners share the machine's load. Seconds per step = (long-run loop time - short-run loop time) / extra
    steps: start-up and the first (warm-up) step cancel out. Reported: s/step, samples/s, our phases (rollout,
    reward, old-log-prob, update, weight sync: per-step means over the long run's steps after the first; the share
    of truncated responses, which overlong filtering masks and the update then skips), peak RSS
    (trainer process; vLLM's engine processes separately), peak CUDA memory on a GPU, and TRL / ours ratios.
    Settings: 512 "a+b=" prompts, 16 prompts x 8 responses per step, 32 new tokens, temperature 1, lr 1e-4
    constant, AdamW without weight decay, clip norm 1, one optimizer step per rollout, dynamic sampling off,
    truncated responses masked (TRL: ``mask_truncated_completions``; dapo-pl then leaves them out of the update,
    TRL runs them with a zero mask; ``--no-overlong-filtering``: masked on neither side, so both run every
    response through the update: equal work), DAPO loss (token-mean, eps 0.2 / 0.28),
    no KL. TRL runs in its own virtualenv (``artifacts/venv-trl``, created on first use: torch 2.13.0 CPU, then
    TRL 1.16; it is not a dapo-pl dependency). ``--omp-wait-policy`` sets ``OMP_WAIT_POLICY`` for every runner
    alike: ``unset`` (the default: libgomp spins briefly, then sleeps; what a user's process gets) or
    ``passive``/``active``. Runs are sequential, so no two runners share the cores; vLLM's engine processes get
    ``PASSIVE`` from dapo-pl itself unless the variable is set.

    Memory mode (``--memory``). A 1-layer Qwen2 (hidden 64) at each vocabulary of ``--vocabs`` and each
    ``micro_batch_max_tokens`` of ``--tokens``: 8 prompts x 8 responses x 128 new tokens, transformers engine,
    no overlong filtering (every response runs through the update), 2 steps, each run in its own memory cgroup
    (cgroup v1, ``--limit-gb``) so an overrun is OOM-killed there instead of hurting the machine. Prints peak RSS (and the cgroup's peak) per cell; killed runs show ``OOM``.

How to run
    python tools/bench_train.py --peer trl                                  # both models, both engines, TRL
    python tools/bench_train.py --models tiny --runners ours-vllm --peer trl --short 3 --long 13 --repeats 3
    python tools/bench_train.py --memory --vocabs 8192 152064 --tokens 2048 8192 --limit-gb 8
    ``--out FILE`` also writes the Markdown; ``--json FILE`` every raw result.

How long
    Speed mode with the defaults: about 25 minutes on 2 busy cores (the 9.5M model's steps take seconds each; each
    vLLM run starts its engine in 10-40 s; the first TRL use installs its virtualenv, about 2 minutes). Memory
    mode: a minute or two per cell. The machine is shared: the load average is printed, and only the ratios taken
    in one invocation mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "artifacts" / "venv-trl"
TRL_SPEC = "trl==1.16.*"
TORCH_CPU = "torch==2.13.0"
RUNNERS = ("ours-transformers", "ours-vllm", "trl")
PHASES = ("rollout", "reward", "old_logprob", "update", "sync")


@dataclass(frozen=True)
class ModelSpec:
    """A randomly initialised Qwen2 (``vocab_size`` 0: the tokenizer's own)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = True
    vocab_size: int = 0


MODELS = {
    "tiny": ModelSpec(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256),
    "9.5m": ModelSpec(layers=6, hidden=384, heads=6, kv_heads=2, intermediate=1024),
}


def memory_model(vocab: int) -> ModelSpec:
    """The memory sweep's model: 1 layer, hidden 64 (2 heads of 32: vLLM needs head dim >= 32)."""
    return ModelSpec(layers=1, hidden=64, heads=2, kv_heads=1, intermediate=256, vocab_size=vocab)


@dataclass(frozen=True)
class Workload:
    """What one training step does, the same for every runner."""

    prompts_per_step: int = 16
    n: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 1e-4
    micro_batch_max_tokens: int = 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--runners", nargs="+", default=["ours-transformers", "ours-vllm"], choices=RUNNERS[:2])
    p.add_argument("--peer", choices=["trl"], help="also run TRL's GRPOTrainer, interleaved")
    p.add_argument("--short", type=int, default=2, help="steps of the short run")
    p.add_argument("--long", type=int, default=6, help="steps of the long run")
    p.add_argument("--repeats", type=int, default=2, help="short/long pairs per runner")
    p.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="both sides recompute activations in the backward (TRL's GRPOConfig default; off: dapo-pl's)",
    )  # fmt: skip
    p.add_argument(
        "--no-overlong-filtering", dest="overlong_filtering", action="store_false",
        help="neither side masks truncated responses, so every response runs the update on both (equal work)",
    )  # fmt: skip
    p.add_argument(
        "--omp-wait-policy", choices=["unset", "passive", "active"], default="unset",
        help="OMP_WAIT_POLICY of every runner's process (unset: libgomp's default)",
    )  # fmt: skip
    p.add_argument("--memory", action="store_true", help="memory mode: sweep vocabulary x micro-batch tokens")
    p.add_argument("--vocabs", nargs="+", type=int, default=[8192, 32768, 65536, 152064])
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--limit-gb", type=float, default=8.0, help="memory mode: each run's cgroup limit")
    p.add_argument("--workdir", default=str(REPO / "artifacts" / "bench_train"), help="models and data")
    p.add_argument("--out", help="also write the Markdown tables here")
    p.add_argument("--json", help="also write every raw result here")
    p.add_argument(
        "--tables-from", metavar="JSON", help="print the tables of a --json file again, run nothing"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run, spec JSON path
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- models and prompts ---------------------------------------------------------------------------------------
def _quickstart() -> Any:
    sys.path.insert(0, str(REPO / "tools"))
    import make_quickstart

    return make_quickstart


def build_model(spec: ModelSpec, out: Path) -> Path:
    """Save a random Qwen2 of ``spec`` with the quickstart tokenizer to ``out`` (reused if already there)."""
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    qs = _quickstart()
    tokenizer = qs.make_tokenizer()
    config = Qwen2Config(
        vocab_size=spec.vocab_size or len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=spec.tied,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_prompts(path: Path, count: int = 512, seed: int = 0) -> Path:
    """``count`` distinct quickstart problems ``{"prompt": "63+4=", "answer": "67"}``."""
    import random

    qs = _quickstart()
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        a, b = qs.sample_problem(rng, 2)
        if (prompt := qs.prompt_text(a, b)) not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": str(a + b)})
    qs.write_jsonl(path, rows)
    return path


def num_params(spec: ModelSpec) -> int:
    """Parameters of a :class:`ModelSpec` model (biases on q/k/v as in Qwen2)."""
    head = spec.hidden // spec.heads
    attn = spec.hidden * (spec.heads + 2 * spec.kv_heads) * head + (spec.heads + 2 * spec.kv_heads) * head
    attn += spec.heads * head * spec.hidden
    layer = attn + 3 * spec.hidden * spec.intermediate + 2 * spec.hidden
    vocab = spec.vocab_size or 259
    return spec.layers * layer + vocab * spec.hidden * (1 if spec.tied else 2) + spec.hidden


# ---- one run of ours, in its own process ---------------------------------------------------------------------
def _peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process, in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _child_peak_rss_mb() -> float:
    """Largest peak RSS among this process's live descendants (vLLM's engine processes)."""
    import psutil

    return max((_peak_rss_mb(c.pid) for c in psutil.Process().children(recursive=True)), default=0.0)


def _timed(fn: Any, totals: dict[str, float], key: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    return wrapper


def _step_recorder(phase_totals: dict[str, float]) -> Any:
    """A callback that records loop wall time, per-step wall time and per-step phase seconds."""
    import lightning as L

    class StepRecorder(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.start = self.end = self.last = 0.0
            self.child_rss_mb = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            engine = trainer.datamodule.engine
            engine.sync_weights = _timed(engine.sync_weights, phase_totals, "sync")
            self.start = self.last = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            now = time.perf_counter()
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            step = {"wall": now - self.last, "rollout": m.get("time/rollout_s", 0.0)}
            step["reward"] = m.get("time/reward_s", 0.0)
            step["old_logprob"] = phase_totals["old_logprob"]
            step["update"] = m.get("time/update_s", 0.0) - phase_totals["old_logprob"]
            step["sync"] = phase_totals["sync"]
            step["logprob_gap"] = m.get("rollout/logprob_abs_diff_mean", float("nan"))
            step["truncated"] = m.get("train/truncated_frac", float("nan"))
            self.steps.append(step)
            phase_totals["old_logprob"] = phase_totals["sync"] = 0.0
            self.last = now
            self.child_rss_mb = max(self.child_rss_mb, _child_peak_rss_mb())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.end = time.perf_counter()

    return StepRecorder()


def _engine_options(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    if engine == "transformers":
        return {"max_batch_sequences": spec["prompts_per_step"] * spec["n"]}
    return {"dtype": "float32", "max_model_len": 16 + spec["max_new_tokens"], "kv_cache_gb": 0.25}


def _build_ours(spec: dict[str, Any]) -> tuple[Any, Any]:
    from dapo_pl.data import PromptDataConfig
    from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig, EngineConfig
    from dapo_pl.engines import SamplingConfig
    from dapo_pl.module import AlgorithmConfig, DAPOModule, OptimConfig

    batch = spec["prompts_per_step"] * spec["n"]
    algo = AlgorithmConfig(
        eps_low=0.2, eps_high=0.28, loss_agg="token-mean", mini_batch_size=batch,
        overlong_filtering=spec.get("overlong_filtering", True),
        micro_batch_max_tokens=spec["micro_batch_max_tokens"],
    )  # fmt: skip
    optim = OptimConfig(lr=spec["lr"], weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    module = DAPOModule(
        spec["model"], algorithm=algo, optim=optim, dtype="float32",
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
    )  # fmt: skip
    rollout = SamplingConfig(
        n=spec["n"], temperature=spec["temperature"], max_new_tokens=spec["max_new_tokens"]
    )
    dm = DAPODataModule(
        train=PromptDataConfig(path=spec["prompts"]), model_name_or_path=spec["model"],
        prompts_per_step=spec["prompts_per_step"], rollout=rollout,
        dynamic_sampling=DynamicSamplingConfig(enabled=False),
        engine=EngineConfig(name=spec["engine"], options=_engine_options(spec["engine"], spec)),
    )  # fmt: skip
    return module, dm


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """One fit of ``spec["steps"]`` steps; loop and per-step times, phases, peak memory."""
    import warnings

    import lightning as L
    import torch

    import dapo_pl.module

    warnings.filterwarnings("ignore")
    phase_totals = {"old_logprob": 0.0, "sync": 0.0}
    if hasattr(dapo_pl.module, "score_old"):  # the old-log-prob pass, wherever the module calls it
        dapo_pl.module.score_old = _timed(dapo_pl.module.score_old, phase_totals, "old_logprob")
    module, dm = _build_ours(spec)
    recorder = _step_recorder(phase_totals)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=spec["steps"], max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    result = {
        "fit_s": fit_s,
        "loop_s": recorder.end - recorder.start,
        "step_log": recorder.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engine_peak_rss_mb": recorder.child_rss_mb,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }
    if dm.engine is not None:
        dm.engine.close()
    return result


# ---- the parent: processes, the TRL virtualenv, cgroups ------------------------------------------------------
def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """TRL's own virtualenv (created on first use): CPU torch first, so that TRL does not pull a CUDA build."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, torch; assert torch.__version__.startswith('2.13.0')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"[bench] creating TRL's virtualenv in {venv} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_CPU], check=True)
    subprocess.run([*pip, TRL_SPEC], check=True)
    # Built against CUDA torch, they break transformers' imports next to the CPU torch (PLATFORM.md).
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
        check=False,
    )
    subprocess.run(probe, check=True)
    return python


class MemoryCgroup:
    """A cgroup v1 memory cgroup for one child process: a hard limit and the peak usage afterwards."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.path = self.ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def enter(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: runs in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20

    def oom_killed(self) -> bool:
        text = (self.path / "memory.oom_control").read_text()
        return any(line == "oom_kill 1" or (line.startswith("oom_kill ") and line != "oom_kill 0")
                   for line in text.splitlines())  # fmt: skip

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _child_env(omp_wait_policy: str = "unset") -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_process(runner: str, spec: dict[str, Any], tmp: Path, cgroup: MemoryCgroup | None = None) -> dict:
    """One run in a fresh process; returns its result (``{"error": ...}`` if it failed)."""
    spec_path, result_path = (
        tmp / f"spec-{time.monotonic_ns()}.json",
        tmp / f"result-{time.monotonic_ns()}.json",
    )
    spec_path.write_text(json.dumps(spec))
    if runner == "trl":
        cmd = [str(ensure_trl_venv()), str(REPO / "tools" / "bench_trl.py"), str(spec_path), str(result_path)]
    else:
        cmd = [sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)]
    proc = subprocess.run(
        cmd,
        env=_child_env(spec.get("omp_wait_policy", "unset")),
        capture_output=True,
        text=True,
        preexec_fn=cgroup.enter if cgroup else None,
    )
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit {proc.returncode}", "tail": tail}
    return json.loads(result_path.read_text())


# ---- speed mode ------------------------------------------------------------------------------------------------
def speed_runs(args: argparse.Namespace, work: Path, tmp: Path) -> list[dict[str, Any]]:
    """Every (model, runner, steps, repeat) run, interleaved so that the runners share the load."""
    prompts = write_prompts(work / "prompts.jsonl")
    runners = list(args.runners) + (["trl"] if args.peer == "trl" else [])
    if "trl" in runners:
        ensure_trl_venv()
    results = []
    for name in args.models:
        model = build_model(MODELS[name], work / f"model-{name}")
        for rep in range(args.repeats):
            for steps in (args.short, args.long):
                for runner in runners:
                    engine = runner.removeprefix("ours-")
                    spec = {**asdict(Workload()), "model": str(model), "prompts": str(prompts)}
                    spec.update(steps=steps, engine=engine, omp_wait_policy=args.omp_wait_policy,
                                gradient_checkpointing=args.gradient_checkpointing,
                                overlong_filtering=args.overlong_filtering)  # fmt: skip
                    t0 = time.perf_counter()
                    res = run_process(runner, spec, tmp)
                    print(
                        f"[bench] {name} {runner} {steps} steps (repeat {rep}): loop "
                        f"{res.get('loop_s', float('nan')):.1f} s, process {time.perf_counter() - t0:.0f} s, "
                        f"load {os.getloadavg()[0]:.1f}"
                        + (f" FAILED {res['error']}" if "error" in res else ""),
                        flush=True,
                    )
                    if "error" in res:
                        print(res["tail"], file=sys.stderr)
                    results.append({"model": name, "runner": runner, "steps": steps, "repeat": rep, **res})
    return results


def per_step_times(
    results: list[dict[str, Any]], model: str, runner: str, short: int, long: int
) -> list[float]:
    """(long loop - short loop) / (long - short) for each repeat with both runs."""
    out = []
    for rep in sorted({r["repeat"] for r in results}):
        runs = {
            r["steps"]: r for r in results if (r["model"], r["runner"], r["repeat"]) == (model, runner, rep)
        }
        if short in runs and long in runs and "error" not in runs[short] and "error" not in runs[long]:
            out.append((runs[long]["loop_s"] - runs[short]["loop_s"]) / (long - short))
    return out


def phase_means(results: list[dict[str, Any]], model: str, runner: str, long: int) -> dict[str, float]:
    """Mean seconds per phase over the long runs' steps after the first."""
    steps = [
        s
        for r in results
        if (r["model"], r["runner"], r["steps"]) == (model, runner, long) and "step_log" in r
        for s in r["step_log"][1:]
    ]
    keys = (*PHASES, "wall", "logprob_gap", "truncated")
    return {k: statistics.fmean(s.get(k, float("nan")) for s in steps) for k in keys} if steps else {}


def direct_step_median(results: list[dict[str, Any]], model: str, runner: str, long: int) -> float | None:
    """Median wall time of the long runs' steps after the first, timed inside the loop (a second estimate)."""
    walls = []
    for r in results:
        if (r["model"], r["runner"], r["steps"]) == (model, runner, long) and "error" not in r:
            walls += [s["wall"] for s in r["step_log"][1:]] if "step_log" in r else r["step_s"][1:]
    return statistics.median(walls) if walls else None


def _fmt_mb(value: float | None) -> str:
    return "-" if not value else f"{value:,.0f}"


def speed_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    batch = Workload().prompts_per_step * Workload().n
    lines = [
        "| model | runner | s/step (median) | samples/s | TRL / this | step wall, direct (TRL / this) | rollout "
        "| reward | old-log-prob | update | sync | gap | truncated | peak RSS MB (engine) | CUDA MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        trl = per_step_times(results, model, "trl", args.short, args.long)
        trl_direct = direct_step_median(results, model, "trl", args.long)
        for runner in [*args.runners, *(["trl"] if args.peer == "trl" else [])]:
            times = per_step_times(results, model, runner, args.short, args.long)
            if not times:
                lines.append(f"| {model} | {runner} | failed |" + " |" * 12)
                continue
            sec = statistics.median(times)
            ratio = f"{statistics.median(trl) / sec:.2f}x" if trl and runner != "trl" else "-"
            ph = phase_means(results, model, runner, args.long)
            cells = [f"{ph[k]:.3f}" for k in PHASES] if ph else ["-"] * len(PHASES)
            gap = f"{ph['logprob_gap']:.1e}" if ph and ph["logprob_gap"] == ph["logprob_gap"] else "-"
            truncated = f"{ph['truncated']:.0%}" if ph and ph["truncated"] == ph["truncated"] else "-"
            runs = [r for r in results if (r["model"], r["runner"]) == (model, runner) and "error" not in r]
            rss = max(r["peak_rss_mb"] for r in runs)
            engine_rss = max(r.get("engine_peak_rss_mb", 0.0) for r in runs)
            cuda = max((r.get("cuda_peak_mb") or 0.0) for r in runs)
            spread = f"{sec:.3f} ({min(times):.3f}-{max(times):.3f})"
            direct = direct_step_median(results, model, runner, args.long) or float("nan")
            direct_cell = f"{direct:.3f}" + (
                f" ({trl_direct / direct:.2f}x)" if trl_direct and runner != "trl" else ""
            )
            lines.append(
                f"| {model} | {runner} | {spread} | {batch / sec:.0f} | {ratio} | {direct_cell} | " + " | ".join(cells)
                + f" | {gap} | {truncated} | {_fmt_mb(rss)} ({_fmt_mb(engine_rss)}) | {_fmt_mb(cuda)} |"
            )  # fmt: skip
    return "\n".join(lines)


# ---- memory mode -----------------------------------------------------------------------------------------------
def memory_runs(args: argparse.Namespace, work: Path, tmp: Path) -> list[dict[str, Any]]:
    prompts = write_prompts(work / "prompts.jsonl")
    workload = Workload(prompts_per_step=8, n=8, max_new_tokens=128)
    results = []
    for vocab in args.vocabs:
        model = build_model(memory_model(vocab), work / f"model-mem-{vocab}")
        for tokens in args.tokens:
            spec = {**asdict(workload), "model": str(model), "prompts": str(prompts), "steps": 2}
            # No overlong filtering: the random model truncates nearly every response, and filtered responses
            # skip the update, which would then measure nothing.
            spec.update(engine="transformers", micro_batch_max_tokens=tokens, overlong_filtering=False)
            cgroup = MemoryCgroup(f"bench-train-{os.getpid()}-{vocab}-{tokens}", int(args.limit_gb * 2**30))
            try:
                res = run_process("ours-transformers", spec, tmp, cgroup)
                res.update(cgroup_peak_mb=cgroup.peak_mb(), oom=cgroup.oom_killed())
            finally:
                cgroup.remove()
            state = "OOM-killed" if res["oom"] else ("failed" if "error" in res else "ok")
            print(
                f"[bench] vocab {vocab} tokens {tokens}: {state}, peak RSS {res.get('peak_rss_mb', 0):.0f} MB, "
                f"cgroup peak {res['cgroup_peak_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if "error" in res and not res["oom"]:
                print(res["tail"], file=sys.stderr)
            results.append({"vocab": vocab, "tokens": tokens, **res})
    return results


def memory_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = "| vocabulary | " + " | ".join(f"{t} tokens/micro-batch" for t in args.tokens) + " | growth |"
    lines = [head, "|" + "---|" * (len(args.tokens) + 2)]
    for vocab in args.vocabs:
        cells, peaks = [], []
        for tokens in args.tokens:
            r = next(x for x in results if (x["vocab"], x["tokens"]) == (vocab, tokens))
            if r["oom"] or "error" in r:
                cells.append(f"{'OOM' if r['oom'] else 'failed'} (> {args.limit_gb:g} GB cgroup)")
                peaks.append(None)
            else:
                cells.append(f"{r['peak_rss_mb']:,.0f} MB (cgroup {r['cgroup_peak_mb']:,.0f})")
                peaks.append(r["peak_rss_mb"])
        growth = f"{100 * (peaks[-1] / peaks[0] - 1):+.0f}%" if peaks[0] and peaks[-1] else "-"
        lines.append(f"| {vocab:,} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def _header(args: argparse.Namespace, load: tuple[float, float], argv: list[str]) -> str:
    what = ", ".join(f"{m} ({num_params(MODELS[m]) / 1e6:.2f}M parameters)" for m in args.models)
    if args.memory:
        what = (
            "1-layer Qwen2, hidden 64, 8 prompts x 8 responses x 128 new tokens, 2 steps, transformers engine"
        )
    else:
        what += (
            f"; 16 prompts x 8 responses, 32 new tokens; per step = (loop of {args.long} steps - loop of "
            f"{args.short}) / {args.long - args.short}, median of {args.repeats} interleaved repeats; "
            f"OMP_WAIT_POLICY {args.omp_wait_policy}; gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'} on both sides; truncated responses "
            f"{'masked' if args.overlong_filtering else 'not masked'} on both sides"
        )
    return (
        f"Models: {what}. {os.cpu_count()} CPU cores, load average {load[0]:.1f} before, {load[1]:.1f} after.\n"
        f"Command: python tools/bench_train.py {' '.join(argv)}".rstrip()
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_ours(json.loads(Path(args.worker).read_text()))))
        return 0
    if not args.memory and args.long <= args.short:
        raise SystemExit("--long must be larger than --short: the per-step time is their difference")
    if args.tables_from:
        results = json.loads(Path(args.tables_from).read_text())
        print(memory_table(results, args) if args.memory else speed_table(results, args))
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            results = memory_runs(args, work, Path(tmp))
            table = memory_table(results, args)
        else:
            results = speed_runs(args, work, Path(tmp))
            table = speed_table(results, args)
    text = f"{_header(args, (load0, os.getloadavg()[0]), argv)}\n\n{table}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

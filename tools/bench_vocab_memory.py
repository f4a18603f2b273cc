"""Peak memory of a short ``dapo-pl fit`` against vocabulary size and tokens per micro-batch (issue 9's fit).

What it does
    Builds a random 1-layer Qwen2 (hidden 64, tied embeddings) whose vocabulary is ``--vocab`` entries (the
    quickstart's character tokenizer; ids beyond it are never produced by the tokenizer but can be sampled and are
    decoded as nothing), writes 64 ``a+b=`` prompts, and runs ``dapo-pl fit`` from configs/quickstart.yaml for
    ``--steps`` steps with 8 prompts x 8 responses x 128 new tokens, the transformers engine, dynamic sampling off
    (a random model gets every answer wrong; every group would be filtered and nothing trained), no validation.
    Each fit runs under ``/usr/bin/time -v`` inside a memory cgroup (cgroup v1, ``--limit-gb``, so a blow-up is
    OOM-killed there and not on the shared machine), once per ``--micro-tokens`` value; prints peak RSS.

How to run
    python tools/bench_vocab_memory.py                                  # 152,064 vocab, micro-batches of 8192
    python tools/bench_vocab_memory.py --vocab 32768 --micro-tokens 2048 8192

How long
    About 1-3 minutes per fit on 2 busy CPU cores (generation of 64 x 128 tokens dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[152_064])
    p.add_argument("--micro-tokens", type=int, nargs="+", default=[8192])
    p.add_argument(
        "--chunk", type=int, default=None, help="model.algorithm.logprob_chunk_tokens (default: its own)"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--limit-gb", type=float, default=6.0)
    return p.parse_args(argv)


def build(out: Path, vocab: int) -> Path:
    sys.path.insert(0, str(REPO / "tools"))
    import torch
    from make_quickstart import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = out / f"model_{vocab}"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for a, b in zip(range(64), range(7, 999, 13), strict=False)
    ]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_dir


def fit_command(model_dir: Path, data: Path, micro_tokens: int, args: argparse.Namespace) -> list[str]:
    cmd = [
        str(Path(sys.executable).parent / "dapo-pl"), "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model_name_or_path", str(model_dir), "--data.train.path", str(data), "--data.val", "null",
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--data.prompts_per_step", "8", "--data.rollout.n", "8", "--data.rollout.max_new_tokens", "128",
        "--data.dynamic_sampling.enabled", "false", "--model.algorithm.mini_batch_size", "64",
        "--model.export_dir", "null",
        "--model.algorithm.micro_batch_max_tokens", str(micro_tokens),
    ]  # fmt: skip
    if args.chunk:
        cmd += ["--model.algorithm.logprob_chunk_tokens", str(args.chunk)]
    return cmd


def run_capped(cmd: list[str], limit_gb: float, cwd: Path) -> tuple[int, float, str]:
    """Run ``cmd`` under /usr/bin/time -v in a fresh memory cgroup; return (exit code, peak RSS GB, log tail)."""
    group = CGROUP / f"bench-vocab-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2**30)))
    inner = f"echo $$ > {group}/cgroup.procs && exec /usr/bin/time -v " + " ".join(f"'{c}'" for c in cmd)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(["sh", "-c", inner], cwd=cwd, env=env, capture_output=True, text=True)
    group.rmdir()
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak = int(match.group(1)) / 2**20 if match else float("nan")
    return proc.returncode, peak, proc.stderr[-1500:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for vocab in args.vocab:
            model_dir = build(out, vocab)
            for micro in args.micro_tokens:
                code, peak, tail = run_capped(
                    fit_command(model_dir, out / "train.jsonl", micro, args), args.limit_gb, out
                )
                if code:
                    print(f"vocab {vocab}, micro {micro}: exit {code}\n{tail}")
                rows.append((vocab, micro, code, peak))
    print("| vocab | micro_batch_max_tokens | exit | peak RSS (GB) |\n|---|---|---|---|")
    for vocab, micro, code, peak in rows:
        print(f"| {vocab:,} | {micro} | {code} | {peak:.2f} |")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

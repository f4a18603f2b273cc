"""Build the ablation's second local task: chained addition with a worked solution whose length varies.

What it does
    1. Writes ``OUT/data/train.jsonl`` (3000 problems) and ``OUT/data/val.jsonl`` (128 held-out problems, disjoint
       from train), rows ``{"prompt": "7+5+9=", "answer": "21"}``: 2 to 5 one-digit operands.
       The worked solution adds one operand per step, ``"7+5=12;12+9=21;Answer: 21"`` + EOS: 1 to 4 steps, so
       its length grows with the number of operands and the size of the running sum (15 to 42 tokens).
    2. Writes ``OUT/model/``: the quickstart's byte-level tokenizer and 4-layer ``Qwen2ForCausalLM`` (0.8M
       parameters; :mod:`make_quickstart`).
    3. Warm-starts it with supervised training on the worked solutions (loss on response tokens only): a clean
       phase, then a noisy phase in which each step is written twice with probability ``repeat_prob`` (a model
       that re-checks its work: longer responses, which the length cap then cuts) and each result digit is
       redrawn with probability ``answer_noise`` (uncertainty when sampling).
    4. Measures on val with ``model.generate`` at the ablation's settings (T=1, K=4, ``max_new_tokens`` cap):
       greedy and sampled accuracy, the share of sampled responses cut by the cap, and the share of prompts whose
       K samples are all right or all wrong (groups dynamic sampling would drop); writes ``OUT/build_report.json``.

Why this task
    The quickstart's answers are at most 12 tokens under a 16-token cap, so overlong filtering and soft overlong
    punishment have nothing to act on. Here the cap (``--max-new-tokens``, 44 by default: every clean solution
    fits, a solution with repeated steps may not) cut 18.6% of the sampled responses of the default build at the
    start, and 55.5% of the val prompts had all 4 samples wrong, 3.1% all 4 right (greedy accuracy 0.555, sampled
    at T=1 0.219).

How to run
    python tools/make_chain_task.py --out artifacts/chain [--force] [--sft-steps N] [--seed 0]

    Like make_quickstart, a finished build writes ``OUT/BUILD_OK``; the same arguments again only say so.

How long
    600 warm-start steps of 32 problems: 416 s measured on the 2 cores under a load average of 12-17 (other jobs
    running); much less on idle cores.

Departures
    As in make_quickstart, the supervised warm start (and its noise) stands in for a pretrained base model; it is
    not part of DAPO.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_quickstart as mq  # noqa: E402  (tools/ is not a package; the quickstart's tokenizer and model)

BUILDER_VERSION = 1
N_TRAIN, N_VAL = 3000, 128
EVAL_K = 4
MAX_NEW_TOKENS = 44


@dataclass(frozen=True)
class ChainRecipe:
    """Everything a chain-task build depends on; a build is reused only when all of it matches."""

    sft_steps: int = 600
    """Supervised warm-start steps (batches of ``batch_size`` fresh problems)."""
    batch_size: int = 32
    """Problems per warm-start step."""
    seed: int = 0
    """Seed for the data, the initialisation and the warm start."""
    min_terms: int = 2
    """Fewest operands."""
    max_terms: int = 5
    """Most operands."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    noisy_fraction: float = 0.25
    """Share of the steps run, at the end, on noisy solutions."""
    answer_noise: float = 0.15
    """In the noisy phase, the chance that each digit of a step's result is redrawn uniformly."""
    repeat_prob: float = 0.25
    """In the noisy phase, the chance that each step is written twice."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """The response cap the build's evaluation uses (the ablation's ``data.rollout.max_new_tokens``)."""
    builder_version: int = BUILDER_VERSION


# ----------------------------------------------------------------------------------------------- data


def sample_terms(rng: random.Random, recipe: ChainRecipe) -> list[int]:
    """``min_terms..max_terms`` one-digit operands (count uniform, each digit uniform)."""
    return [rng.randint(0, 9) for _ in range(rng.randint(recipe.min_terms, recipe.max_terms))]


def prompt_text(terms: Sequence[int]) -> str:
    """E.g. ``prompt_text([57, 6, 31]) == "57+6+31="``."""
    return "+".join(map(str, terms)) + "="


def solution_text(
    terms: Sequence[int], rng: random.Random | None = None, noise: float = 0.0, repeat: float = 0.0
) -> str:
    """The worked solution, e.g. ``solution_text([57, 6, 31]) == "57+6=63;63+31=94;Answer: 94"``.

    With ``rng``: each step's result digits are redrawn with probability ``noise`` (the chain goes on from the
    written result, as a model would), and each step is written twice with probability ``repeat``.
    """
    steps, acc = [], terms[0]
    for t in terms[1:]:
        result = str(acc + t)
        if rng is not None:
            result = mq.noisy_answer(result, rng, noise)
        step = f"{acc}+{t}={result};"
        steps.append(step + step if rng is not None and rng.random() < repeat else step)
        acc = int(result)
    return "".join(steps) + f"{mq.ANSWER_PREFIX}{acc}"


def make_splits(recipe: ChainRecipe) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Val (drawn first) and train problems, each without duplicate prompts, disjoint from each other."""
    rng = random.Random(recipe.seed)
    seen: set[str] = set()
    splits: list[list[dict[str, str]]] = []
    for n in (N_VAL, N_TRAIN):
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            terms = sample_terms(rng, recipe)
            if (p := prompt_text(terms)) not in seen:
                seen.add(p)
                rows.append({"prompt": p, "answer": str(sum(terms))})
        splits.append(rows)
    val, train = splits
    return train, val


# --------------------------------------------------------------------------------------- warm start


def sft_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding) of
    (prompt, response) pairs; the response gets EOS.

    Shapes: all three ``[B, T]``, T the longest prompt + response + EOS in the batch.
    """
    import torch

    seqs, labels = [], []
    for prompt, response in pairs:
        p = tokenizer.encode(prompt)
        r = tokenizer.encode(response) + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [B, T]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [B, T]
    lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])  # [B, T]
    return ids, mask, lab


def warm_start(model: Any, tokenizer: Any, recipe: ChainRecipe, exclude: set[str]) -> dict[str, float]:
    """Clean phase (cosine ``lr`` -> ``lr/4``), then the noisy phase (``lr/4`` -> ``lr/10``); never a val prompt."""
    import torch

    rng = random.Random(recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.1)
    noisy_steps = round(recipe.sft_steps * recipe.noisy_fraction)
    clean_steps = recipe.sft_steps - noisy_steps
    model.train()
    loss = torch.zeros(())
    for step in range(recipe.sft_steps):
        noisy = step >= clean_steps
        if noisy:
            lr = mq.lr_at(
                mq.WARMUP_STEPS + step - clean_steps,
                mq.WARMUP_STEPS + noisy_steps,
                recipe.lr / 4,
                recipe.lr / 10,
            )
        else:
            lr = mq.lr_at(step, clean_steps, recipe.lr, recipe.lr / 4)
        pairs = []
        while len(pairs) < recipe.batch_size:
            terms = sample_terms(rng, recipe)
            if (p := prompt_text(terms)) not in exclude:
                extra = (rng, recipe.answer_noise, recipe.repeat_prob) if noisy else ()
                pairs.append((p, solution_text(terms, *extra)))
        ids, mask, labels = sft_batch(tokenizer, pairs)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(
                f"  sft step {step:4d} ({'noisy' if noisy else 'clean'})  lr {lr:.2e}  loss {loss.item():.4f}",
                flush=True,
            )
    model.eval()
    return {"clean_steps": clean_steps, "noisy_steps": noisy_steps, "final_loss": float(loss.item())}


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, str]], recipe: ChainRecipe
) -> dict[str, float]:
    """Greedy accuracy; at T=1 with K samples: accuracy, truncated share, all-right and all-wrong prompt shares."""
    import torch

    torch.manual_seed(recipe.seed)
    prompts = [r["prompt"] for r in rows]
    cap = recipe.max_new_tokens
    greedy = mq.generate(model, tokenizer, prompts, temperature=0.0, k=1, cap=cap)
    sampled = mq.generate(model, tokenizer, prompts, temperature=1.0, k=EVAL_K, cap=cap)
    right = [[mq.extract_answer(t) == r["answer"] for t, _ in s] for r, s in zip(rows, sampled, strict=True)]
    cut = [not ended for s in sampled for _, ended in s]
    return {
        "greedy_acc": sum(
            mq.extract_answer(s[0][0]) == r["answer"] for r, s in zip(rows, greedy, strict=True)
        )
        / len(rows),
        "t1_acc": sum(map(sum, right)) / (len(rows) * EVAL_K),
        "t1_truncated_frac": sum(cut) / len(cut),
        "t1_all_right_frac": sum(all(g) for g in right) / len(rows),
        "t1_all_wrong_frac": sum(not any(g) for g in right) / len(rows),
    }


# --------------------------------------------------------------------------------------------- build


def build(out: Path, *, force: bool = False, **fields: Any) -> dict[str, Any]:
    """Build data and model into ``out`` (skipped when a complete build of the same recipe is there)."""
    out = Path(out)
    recipe = ChainRecipe(**fields)
    args = asdict(recipe)
    if not force and (report := mq._existing_build(out, args)) is not None:
        return {**report, "skipped": True}
    torch, threads = mq._torch_with_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build_fresh(out, recipe)
    finally:
        torch.set_num_threads(previous)


def _build_fresh(out: Path, recipe: ChainRecipe) -> dict[str, Any]:
    start = time.perf_counter()
    mq._clear(out)
    train, val = make_splits(recipe)
    mq.write_jsonl(out / "data" / "train.jsonl", train)
    mq.write_jsonl(out / "data" / "val.jsonl", val)
    tokenizer = mq.make_tokenizer()
    model = mq.make_model(tokenizer, recipe.seed)
    sft = warm_start(model, tokenizer, recipe, exclude={r["prompt"] for r in val})
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    report = {
        "args": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "sft": sft,
        "build_seconds": None,
        "val": {"n_prompts": len(val), "k": EVAL_K, **evaluate(model, tokenizer, val, recipe)},
    }
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    (out / mq.REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (out / mq.MARKER).write_text(json.dumps(asdict(recipe)) + "\n")  # last: the build is complete
    return {**report, "skipped": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="artifacts/chain", help="output folder (data/ and model/ go inside)")
    parser.add_argument("--sft-steps", type=int, default=ChainRecipe.sft_steps, help="warm-start steps")
    parser.add_argument(
        "--seed", type=int, default=ChainRecipe.seed, help="seed of data, init and warm start"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="response cap of the evaluation"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build is there")
    args = parser.parse_args(argv)
    report = build(
        Path(args.out),
        force=args.force,
        sft_steps=args.sft_steps,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    v = report["val"]
    print(
        f"chain task in {args.out} ({'up to date' if report['skipped'] else 'built'} in {report['build_seconds']} s): "
        f"greedy acc {v['greedy_acc']:.3f}, T=1 acc {v['t1_acc']:.3f}, truncated {v['t1_truncated_frac']:.3f}, "
        f"all-right groups {v['t1_all_right_frac']:.3f}, all-wrong {v['t1_all_wrong_frac']:.3f} (K={v['k']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

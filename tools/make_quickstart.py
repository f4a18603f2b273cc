"""Build the CPU quickstart's starting point: a tiny addition task and a warm-started tiny model.

What it does
    1. Writes ``OUT/data/train.jsonl`` (2000 problems) and ``OUT/data/val.jsonl`` (128 held-out problems,
       disjoint from train), rows ``{"prompt": "63+4=", "answer": "67"}``, deterministic from ``--seed``.
       Each operand has 1 or 2 digits (digit count uniform, then the value).
    2. Writes ``OUT/model/``: a byte-level tokenizer without merges (one token per byte, so per ASCII
       character; ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, byte b = 3 + b) and a 4-layer ``Qwen2ForCausalLM``
       (hidden 128, 4 heads of 32, 822k parameters, 3.3 MB in float32 safetensors) that vLLM and
       transformers both load (greedy outputs of the two were identical on all 128 val prompts).
    3. Warm-starts that model with supervised training on the response ``"Answer: 67"`` + EOS (loss on
       response tokens only), on fresh problems from the same distribution minus the val prompts: first on
       true answers until it has learned to add (or 1200 steps), then 400 steps on noisy answers (each digit
       redrawn uniformly with probability 0.4), so the model ends up right at its argmax (greedy 87-97% over
       seeds 0-2) but unsure when sampling (22-31% at T=1, 63-71% at T=0.5).
    4. Measures on val, with ``model.generate``: greedy accuracy and sampled accuracy (K=4 samples per prompt,
       top_p 1, no top-k) at temperatures 1.0 and 0.5, plus the share of well-formed responses
       (``Answer: <digits>`` then EOS); prints them and writes ``OUT/build_report.json``. RL then has to raise
       sampled accuracy at T=1 towards greedy accuracy: sharpening a distribution the model already has.

How to run
    python tools/make_quickstart.py --out artifacts/quickstart [--force] [--sft-steps N] [--seed 0]

    A finished build ends by writing ``OUT/BUILD_OK`` with its arguments; run again with the same arguments it
    only says so and exits (before importing torch). Different arguments, or ``--force``, rebuild. Python code
    can call :func:`build`.

How long
    Up to 1600 warm-start steps, evaluation ~1 s: 170 s measured on the 2 cores under a load average of 3-4
    (other jobs running), 260-340 s under a load average of 5-8; less on idle cores. Torch uses 2 threads
    waiting passively (``OMP_WAIT_POLICY=PASSIVE``, see ``_torch_with_threads``).

Departures
    DAPO starts RL from a pretrained base model (Qwen2.5-32B). A model small enough for a CPU quickstart has no
    pretraining, so this script gives it a supervised warm start instead; that step is not part of DAPO. The
    noisy answers at the end of it are ours too: they stand in for a base model's uncertainty, and they make
    the starting point robust to the seed (a plain warm start stopped part-way swings between ~25% and ~100%
    greedy accuracy from seed to seed, as the model learns carrying at an unpredictable step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUILDER_VERSION = 2  # bump when the build changes in a way the recipe does not show
MARKER = "BUILD_OK"
REPORT = "build_report.json"

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ANSWER_PREFIX = "Answer: "
N_TRAIN, N_VAL = 2000, 128
EVAL_K = 4
MAX_NEW_TOKENS = 16  # "Answer: 198" is 11 characters, plus EOS; room for max_digits=3 ("Answer: 1998")

BATCH_SIZE = 64
WARMUP_STEPS = 30
CONVERGED_LOSS = 0.02  # mean response-token loss at which the clean phase may end early


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on; a build is reused only when all of it matches."""

    sft_steps: int = 1600
    """Most supervised warm-start steps (batches of 64 fresh problems); the clean phase may end early."""
    seed: int = 0
    """Seed for the data, the initialisation and the warm start."""
    max_digits: int = 2
    """Operands have 1 to ``max_digits`` digits."""
    lr: float = 3e-3
    """Peak AdamW learning rate of the warm start."""
    weight_decay: float = 0.1
    """AdamW weight decay (0.1 made the step at which the model "gets" carrying less seed-dependent than 0.01)."""
    answer_noise: float = 0.4
    """In the noisy phase, the chance that each answer digit of a target is
    replaced by a uniformly drawn digit: the model stays right at its argmax but unsure when sampling."""
    noisy_fraction: float = 0.25
    """Share of ``sft_steps`` run, at the end, on noisy answers (the noisy phase)."""
    builder_version: int = BUILDER_VERSION


# ----------------------------------------------------------------------------------------------- data


def prompt_text(a: int, b: int) -> str:
    """The prompt for ``a + b``; e.g. ``prompt_text(123, 45) == "123+45="``."""
    return f"{a}+{b}="


def response_text(answer: str) -> str:
    """The target response (without EOS); e.g. ``response_text("168") == "Answer: 168"``."""
    return f"{ANSWER_PREFIX}{answer}"


def sample_problem(rng: random.Random, max_digits: int) -> tuple[int, int]:
    """Two operands, each with a digit count drawn uniformly from 1..max_digits, then a value of that length."""

    def operand() -> int:
        d = rng.randint(1, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    return operand(), operand()


def make_splits(seed: int, max_digits: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Val (drawn first) and train problems, each without duplicate prompts, disjoint from each other."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict[str, str]]] = []
    for n in (N_VAL, N_TRAIN):
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            a, b = sample_problem(rng, max_digits)
            p = prompt_text(a, b)
            if p not in seen:
                seen.add(p)
                rows.append({"prompt": p, "answer": str(a + b)})
        splits.append(rows)
    val, train = splits
    return train, val


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------ tokenizer


def byte_chars() -> list[str]:
    """The 256 characters that byte-level tokenizers (GPT-2, Qwen2) use for the bytes 0..255, in byte order.

    Printable ASCII maps to itself; e.g. space is ``"\u0120"`` (``Ġ``) and newline ``"\u010a"`` (``Ċ``).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_tokenizer() -> Any:
    """A byte-level tokenizer without merges: one token per byte, so one per ASCII character.

    Ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``; byte ``b`` is id ``3 + b`` (e.g. ``"0"`` is 51). Nothing is added
    on encode (no BOS/EOS). It is byte-level BPE rather than a WordLevel model over characters because
    transformers 5 ``AutoTokenizer`` loads every tokenizer of a ``qwen2`` model as ``Qwen2Tokenizer``, which
    rebuilds a byte-level BPE pipeline from the saved vocabulary: this tokenizer *is* that pipeline, so
    ``AutoTokenizer``, ``PreTrainedTokenizerFast``, the raw ``tokenizer.json`` and vLLM all agree on it.
    (A WordLevel vocabulary came back from ``AutoTokenizer`` silently dropping spaces and newlines.)
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *byte_chars()])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=256
    )


# ---------------------------------------------------------------------------------------------- model


def make_model(tokenizer: Any, seed: int) -> Any:
    """A randomly initialised 4-layer Qwen2 (head dim 32: vLLM needs at least 32)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        # Like Qwen2's own checkpoints, BOS shares the EOS id; the tokenizer never prepends it.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


# --------------------------------------------------------------------------------------- warm start


def noisy_answer(answer: str, rng: random.Random, noise: float) -> str:
    """``answer`` with each digit replaced, with probability ``noise``, by a uniformly drawn digit."""
    return "".join(rng.choice("0123456789") if rng.random() < noise else c for c in answer)


def sft_batch(tokenizer: Any, problems: Sequence[tuple[int, int, str]]) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).

    Shapes: all three ``[B, T]``, T the longest prompt + response + EOS in the batch.
    """
    import torch

    seqs, labels = [], []
    for a, b, target in problems:
        p = tokenizer.encode(prompt_text(a, b))
        r = tokenizer.encode(response_text(target)) + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [B, T]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [B, T]
    lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])  # [B, T]
    return ids, mask, lab


def lr_at(step: int, steps: int, peak: float, end: float) -> float:
    """Cosine decay from ``peak`` to ``end`` over ``steps``, after a linear warm-up over ``WARMUP_STEPS``."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def draw_batch(
    rng: random.Random, recipe: Recipe, noise: float, exclude: set[str]
) -> list[tuple[int, int, str]]:
    """``BATCH_SIZE`` fresh problems (never a prompt in ``exclude``) with their possibly noisy target answers."""
    problems: list[tuple[int, int, str]] = []
    while len(problems) < BATCH_SIZE:
        a, b = sample_problem(rng, recipe.max_digits)
        if prompt_text(a, b) not in exclude:
            problems.append((a, b, noisy_answer(str(a + b), rng, noise)))
    return problems


def warm_start(model: Any, tokenizer: Any, recipe: Recipe, exclude: set[str]) -> dict[str, float]:
    """Supervised warm start on fresh problems (never a val prompt), in two phases.

    Clean phase: true answers, until the mean loss of the last 50 steps is below ``CONVERGED_LOSS`` (the
    model has learned to add; when that happens varies a lot with the seed) or ``sft_steps - noisy_steps``
    steps have run; learning rate cosine from ``lr`` to ``lr / 4``. Noisy phase: ``noisy_steps`` steps on
    noisy answers (``answer_noise``), learning rate cosine from ``lr / 4`` to ``lr / 10``.
    Returns the step counts of both phases and the mean loss of the last 50 steps.
    """
    import torch

    rng = random.Random(recipe.seed + 1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )
    noisy_steps = round(recipe.sft_steps * recipe.noisy_fraction)
    clean_cap = recipe.sft_steps - noisy_steps
    clean_steps: int | None = None  # set when the clean phase ends
    recent: list[float] = []
    model.train()
    for step in range(recipe.sft_steps):
        converged = len(recent) == 50 and sum(recent) / 50 < CONVERGED_LOSS
        if clean_steps is None and (step == clean_cap or converged):
            clean_steps = step
        if clean_steps is None:
            lr, noise = lr_at(step, clean_cap, recipe.lr, recipe.lr / 4), 0.0
        elif step - clean_steps < noisy_steps:
            since = WARMUP_STEPS + step - clean_steps  # past the warm-up: the noisy phase has none
            lr, noise = (
                lr_at(since, WARMUP_STEPS + noisy_steps, recipe.lr / 4, recipe.lr / 10),
                recipe.answer_noise,
            )
        else:
            break
        ids, mask, labels = sft_batch(tokenizer, draw_batch(rng, recipe, noise, exclude))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over response tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == clean_steps:
            phase = "clean" if clean_steps is None else "noisy"
            print(f"  sft step {step:4d} ({phase})  lr {lr:.2e}  loss {loss.item():.4f}", flush=True)
    model.eval()
    clean = recipe.sft_steps if clean_steps is None else clean_steps
    return {
        "clean_steps": clean,
        "noisy_steps": min(noisy_steps, recipe.sft_steps - clean),
        "final_loss": sum(recent) / max(1, len(recent)),
    }


# ------------------------------------------------------------------------------------------ evaluate


def extract_answer(text: str) -> str | None:
    """The text after the last ``Answer:``, stripped (the RL verifier's rule); None when there is none."""
    if "Answer:" not in text:
        return None
    return text.rsplit("Answer:", 1)[1].strip()


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    temperature: float,
    k: int,
    cap: int = MAX_NEW_TOKENS,
) -> list[list[Any]]:
    """``k`` responses per prompt (``temperature == 0``: greedy, k must be 1) of at most ``cap`` new tokens, as
    ``(text, ended_with_eos)``.

    Shapes: prompts are left-padded to ``[P, Tp]``; ``generate`` returns ``[P * k, Tp + new]``.
    """
    import torch

    enc = [tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])  # [P, Tp]
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])  # [P, Tp]
    # top_k=0: plain temperature sampling, as in RL (transformers would otherwise apply its default top-k).
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cap,
            num_return_sequences=k,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            **sampling,
        )
    new = out[:, width:]  # [P * k, new]
    results = []
    for row in new.tolist():
        ended = tokenizer.eos_token_id in row
        if ended:
            row = row[: row.index(tokenizer.eos_token_id)]
        results.append((tokenizer.decode(row), ended))
    return [results[i * k : (i + 1) * k] for i in range(len(prompts))]


def score(rows: Sequence[dict[str, str]], responses: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Mean correctness (exact match after the last ``Answer:``) and share of well-formed responses
    (exactly ``Answer: <digits>`` then EOS), over all ``len(rows) * k`` samples."""
    correct = formatted = total = 0
    for row, samples in zip(rows, responses, strict=True):
        for text, ended in samples:
            total += 1
            correct += extract_answer(text) == row["answer"]
            body = text[len(ANSWER_PREFIX) :]
            formatted += ended and text.startswith(ANSWER_PREFIX) and body.isdigit()
    return {"acc": correct / total, "format": formatted / total}


def target_probability(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, str]], temperature: float
) -> float:
    """Mean over ``rows`` of the probability, sampling at ``temperature``, of exactly the target response
    (``"Answer: 67"`` then EOS): the sampled accuracy without sampling noise (a slight underestimate, since
    e.g. ``"Answer:67"`` also passes the verifier).

    Shapes: ``logits`` ``[B, T, V]``; the log-probability of token t+1 is read at position t.
    """
    import torch

    problems = []
    for r in rows:
        a, b = r["prompt"].removesuffix("=").split("+")
        problems.append((int(a), int(b), r["answer"]))
    ids, mask, labels = sft_batch(tokenizer, problems)  # [B, T] each
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double() / temperature  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]
    target = labels[:, 1:]  # [B, T-1]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    seq_logp = (picked * (target != -100)).sum(-1)  # [B]
    return seq_logp.exp().mean().item()


def evaluate(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]], seed: int) -> dict[str, float]:
    """Greedy accuracy, and sampled accuracy (K=4, top_p 1) at temperatures 1.0 and 0.5, on ``rows``;
    also the exact expectation of the sampled accuracies (``*_target_prob``, see :func:`target_probability`)."""
    import torch

    torch.manual_seed(seed)
    prompts = [r["prompt"] for r in rows]
    metrics: dict[str, float] = {}
    for name, temperature, k in (("greedy", 0.0, 1), ("t1", 1.0, EVAL_K), ("t05", 0.5, EVAL_K)):
        s = score(rows, generate(model, tokenizer, prompts, temperature=temperature, k=k))
        metrics[f"{name}_acc"] = s["acc"]
        metrics[f"{name}_format"] = s["format"]
        if temperature > 0:
            metrics[f"{name}_target_prob"] = target_probability(model, tokenizer, rows, temperature)
    return metrics


# --------------------------------------------------------------------------------------------- build


def _existing_build(out: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a complete build in ``out`` made with ``args``, or None."""
    try:
        if json.loads((out / MARKER).read_text()) == args:
            return json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        pass
    return None


def _clear(out: Path) -> None:
    """Remove what a previous build wrote (only our own entries: ``--out`` may be a shared folder)."""
    (out / MARKER).unlink(missing_ok=True)  # first, so an interrupted clean never looks complete
    for name in ("data", "model"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / REPORT).unlink(missing_ok=True)


def build(
    out: Path,
    *,
    sft_steps: int = Recipe.sft_steps,
    seed: int = Recipe.seed,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Build data and model into ``out`` (skipped when a complete build with the same arguments is there).

    ``overrides`` sets other :class:`Recipe` fields (e.g. ``max_digits=2``). Returns the build report (also in
    ``out/build_report.json``), with ``"skipped": True`` when nothing was done.
    """
    out = Path(out)
    recipe = Recipe(sft_steps=sft_steps, seed=seed, **overrides)
    args = asdict(recipe)
    if not force and (report := _existing_build(out, args)) is not None:
        return {**report, "skipped": True}

    torch, threads = _torch_with_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build_fresh(out, recipe)
    finally:
        torch.set_num_threads(previous)  # build() may run inside another program (the tests)


def _torch_with_threads() -> tuple[Any, int]:
    """Import torch with passive OpenMP waiting where possible; 2 threads if waiting is passive, else 1.

    OpenMP threads that spin while they wait made the warm start 5-20x slower when other processes shared the
    2 cores (measured: 1.2 s a step instead of 0.2 s; a 5-step build 151 s instead of 8 s); passive waiting
    costs little when the cores are idle. The setting only takes effect before torch is first imported (the
    command line; not under pytest, whose conftest imports torch), and a value set by the user wins.
    """
    user_policy = os.environ.get("OMP_WAIT_POLICY")
    torch_loaded = "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    passive = (user_policy or ("" if torch_loaded else "PASSIVE")).upper() == "PASSIVE"
    return torch, 2 if passive else 1


def _build_fresh(out: Path, recipe: Recipe) -> dict[str, Any]:
    """Write data and model into ``out`` (replacing an earlier build's files), evaluate, write the marker last."""
    import torch

    start = time.perf_counter()
    seed = recipe.seed
    _clear(out)
    train, val = make_splits(seed, recipe.max_digits)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "val.jsonl", val)

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed)
    sft = warm_start(model, tokenizer, recipe, exclude={r["prompt"] for r in val})
    sft_seconds = time.perf_counter() - start
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")

    metrics = evaluate(model, tokenizer, val, seed)
    report = {
        "args": asdict(recipe),
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": sum(f.stat().st_size for f in (out / "model").iterdir()),
        "token_ids": {
            "pad": tokenizer.pad_token_id,
            "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id,
        },
        "vocab_size": len(tokenizer),
        "sft": sft,
        "sft_seconds": round(sft_seconds, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "val": {"n_prompts": len(val), "k": EVAL_K, **metrics},
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (out / MARKER).write_text(
        json.dumps(asdict(recipe)) + "\n"
    )  # last: its presence means the build is complete
    return {**report, "skipped": False}


def summary(report: dict[str, Any], out: Path) -> str:
    v = report["val"]
    return "\n".join(
        [
            f"quickstart build in {out} ({'up to date, nothing to do' if report['skipped'] else 'built'})",
            f"  args: {json.dumps(report['args'])}",
            f"  build time {report['build_seconds']} s (warm start {report['sft_seconds']} s: "
            f"{report['sft']['clean_steps']} clean + {report['sft']['noisy_steps']} noisy steps), "
            f"{report['params']:,} parameters, model folder {report['model_bytes'] / 1e6:.1f} MB",
            f"  val ({v['n_prompts']} prompts): greedy acc {v['greedy_acc']:.3f}, "
            f"sampled acc (K={v['k']}) at T=1.0 {v['t1_acc']:.3f}, at T=0.5 {v['t05_acc']:.3f}",
            f"  exact P(target response): T=1.0 {v['t1_target_prob']:.3f}, T=0.5 {v['t05_target_prob']:.3f}",
            f"  well-formed responses: greedy {v['greedy_format']:.3f}, T=1.0 {v['t1_format']:.3f}, "
            f"T=0.5 {v['t05_format']:.3f}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (data/, model/, build_report.json)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build is there")
    parser.add_argument("--sft-steps", type=int, default=Recipe.sft_steps, help="supervised warm-start steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training")
    ns = parser.parse_args(argv)
    report = build(ns.out, sft_steps=ns.sft_steps, seed=ns.seed, force=ns.force)
    print(summary(report, ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed of the transformers engine's own sampling loop against ``transformers``' ``generate``.

What it does
    Builds a random Qwen2 with the quickstart's character tokenizer (``--layers``, ``--hidden``; the default is the
    issue-9 tiny model: 2 layers, hidden 128, 4 heads, 2 KV heads, intermediate 256, tied embeddings) and times, on
    the same ``a+b=`` prompts, interleaved, best of ``--repeats``:
    - ``generate``: ``model.generate(do_sample=True, num_return_sequences=n, output_logits=True)`` and the
      sampled tokens' log-probs from the stacked ``[P*n, T, V]`` logits: what the engine did before (and what TRL's
      GRPOTrainer does without vLLM, minus the log-probs);
    - ``loop``: :class:`dapo_pl.engines.hf.TransformersEngine` (:func:`dapo_pl.engines.hf.sample`).
    Prints generated tokens per second of each and the ratio. Temperature 1, top_p 1, top_k 0, seeded.

How to run
    python tools/bench_generation.py                                  # 16 prompts x 8, 32 new tokens
    python tools/bench_generation.py --layers 4 --hidden 128 --intermediate 384 --prompts 64 --max-new-tokens 64
    python tools/bench_generation.py --model artifacts/quickstart/model     # trained: responses end at EOS

How long
    Tens of seconds on 2 busy CPU cores with the defaults. The machines are shared: compare only the ratio of one
    run; the load average is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="a model folder with its tokenizer (e.g. artifacts/quickstart/model) instead"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def _tokenizer() -> Any:
    spec = importlib.util.spec_from_file_location("make_quickstart", REPO / "tools" / "make_quickstart.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    return tool.make_tokenizer()


def _model(tokenizer: Any, args: argparse.Namespace) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def generate_baseline(model: Any, tokenizer: Any, prompts: list[list[int]], args: argparse.Namespace) -> int:
    """``transformers.generate`` with stacked logits; returns the number of generated (non-pad) tokens."""
    from dapo_pl.engines.hf import _left_pad
    from dapo_pl.objective import logprobs_from_logits

    ids, mask = _left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
            max_new_tokens=args.max_new_tokens, num_return_sequences=args.n, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[tokenizer.eos_token_id], return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    new = out.sequences[:, ids.shape[1] :]  # [P*n, T]
    logprobs_from_logits(torch.stack(out.logits, dim=1).float(), new)  # [P*n, T], as the old engine did
    return _count(new.tolist(), tokenizer.eos_token_id)


def _count(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dapo_pl.engines import SamplingConfig
    from dapo_pl.engines.hf import TransformersEngine

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    else:
        tokenizer = _tokenizer()
        model = _model(tokenizer, args)
    prompts = [
        tokenizer.encode(f"{a}+{b}=") for a, b in zip(range(3, 999, 37), range(11, 999, 53), strict=False)
    ]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    engine = TransformersEngine(tokenizer, max_batch_sequences=args.prompts * args.n)
    engine.sync_weights(model)
    params = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens)

    def loop(seed: int) -> int:
        return sum(len(c.token_ids) for g in engine.generate(prompts, params, seed=seed) for c in g)

    def baseline(seed: int) -> int:
        torch.manual_seed(seed)
        return generate_baseline(model, tokenizer, prompts, args)

    print(f"load average before: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    best: dict[str, float] = {"generate": 0.0, "loop": 0.0}
    for fn in (baseline, loop):
        fn(0)  # warm-up
    for rep in range(args.repeats):
        for name, fn in (("generate", baseline), ("loop", loop)):
            t0 = time.perf_counter()
            tokens = fn(rep + 1)
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    size = args.model or f"{args.layers} layers, hidden {args.hidden}"
    print(f"model: {size}; {args.prompts} prompts x {args.n}, "
          f"{args.max_new_tokens} new tokens; best of {args.repeats}")  # fmt: skip
    print("| engine | tokens/s |\n|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value:,.0f} |")
    print(f"loop / generate: {best['loop'] / best['generate']:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TRL's ``GRPOTrainer`` on a benchmark spec: the peer side of ``tools/bench_train.py --peer trl``.

It runs inside TRL's own virtualenv (``artifacts/venv-trl``, made by ``bench_train.py``; TRL is not a dapo-pl
dependency), so it imports nothing from dapo-pl. ``bench_train.py`` writes a JSON spec (model folder, prompts,
settings, steps) and reads back a JSON result: wall time of ``trainer.train()`` and of its training loop, per-step
times, peak RSS and, on a GPU, peak CUDA memory.

Settings (the issue's): ``loss_type="dapo"``, ``epsilon=0.2``, ``epsilon_high=0.28``, ``beta=0`` (no reference
model), ``mask_truncated_completions=True`` (the spec's ``overlong_filtering``), no vLLM; one optimizer step per rollout (``steps_per_generation=1``,
``num_iterations=1``, one micro-batch of all ``prompts x n`` completions); AdamW at a constant learning rate without
warm-up or weight decay, gradients clipped at norm 1, float32, as the dapo-pl side is configured. Gradient
checkpointing (on by default in ``GRPOConfig``, off by default in dapo-pl) is set from the spec for both sides
alike (``bench_train.py --gradient-checkpointing``): TRL's default would make it recompute every forward.

How to run: only through ``bench_train.py`` (``python tools/bench_trl.py SPEC.json RESULT.json`` by hand).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any


def _reward_fn(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """+1 for exactly ``Answer: <answer>``, else -1: the exact-match verifier of the dapo-pl side."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if t.strip() == f"Answer: {a}" else -1.0 for t, a in zip(texts, answer, strict=True)]


def _config(spec: dict[str, Any], out_dir: str, cuda: bool) -> Any:
    from trl import GRPOConfig

    batch = spec["prompts_per_step"] * spec["n"]
    return GRPOConfig(
        output_dir=out_dir, max_steps=spec["steps"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=spec["n"],
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        mask_truncated_completions=spec.get("overlong_filtering", True), use_vllm=False, logging_steps=1, report_to="none",
        save_strategy="no", seed=0, use_cpu=not cuda, bf16=False, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=spec.get("gradient_checkpointing", False),
    )  # fmt: skip


def _timer() -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.steps: list[float] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = self.last = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.end = time.perf_counter()

    return Timer()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    cuda = torch.cuda.is_available()
    rows = [json.loads(line) for line in open(spec["prompts"])]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    timer = _timer()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model, reward_funcs=_reward_fn, args=_config(spec, out_dir, cuda), train_dataset=dataset,
            processing_class=tokenizer, callbacks=[timer],
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.train()
        fit_s = time.perf_counter() - t0
    return {
        "fit_s": fit_s,
        "loop_s": timer.end - timer.start,
        "step_s": timer.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "versions": {"trl": __import__("trl").__version__, "torch": torch.__version__},
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""tools/make_chain_task.py: the chained-addition task's data and worked solutions, and a tiny build (5 warm-start
steps) that the ablation's rows can load (model folder, data, report)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tool_loading import load_tool

mc = load_tool("make_chain_task")


def test_worked_solution_hand_worked() -> None:
    """7+5+9: 7+5=12, 12+9=21. Two operands: one step. Noise redraws result digits and the chain goes on from the
    written result; a repeated step is written twice."""
    assert mc.solution_text([7, 5, 9]) == "7+5=12;12+9=21;Answer: 21"
    assert mc.solution_text([3, 4]) == "3+4=7;Answer: 7"
    assert mc.prompt_text([7, 5, 9]) == "7+5+9="
    always_repeat = mc.solution_text([3, 4], random.Random(0), noise=0.0, repeat=1.0)
    assert always_repeat == "3+4=7;3+4=7;Answer: 7"
    noisy = mc.solution_text([9, 9, 9], random.Random(1), noise=1.0, repeat=0.0)
    first, second, answer = noisy.split(";")
    assert first.startswith("9+9=") and second.startswith(
        first.split("=")[1] + "+9="
    )  # goes on from the written sum
    assert answer == "Answer: " + second.split("=")[1]


def test_splits_are_deterministic_disjoint_and_vary_in_length() -> None:
    recipe = mc.ChainRecipe()
    train, val = mc.make_splits(recipe)
    assert (len(train), len(val)) == (mc.N_TRAIN, mc.N_VAL)
    assert mc.make_splits(recipe) == (train, val)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    for row in train[:50]:
        terms = [int(t) for t in row["prompt"].removesuffix("=").split("+")]
        assert 2 <= len(terms) <= 5 and row["answer"] == str(sum(terms))
    lengths = {len(mc.solution_text([int(t) for t in r["prompt"][:-1].split("+")])) + 1 for r in train}
    assert min(lengths) <= 16 and max(lengths) == 42 <= mc.MAX_NEW_TOKENS  # every clean solution fits the cap


@pytest.mark.slow
def test_tiny_build_loads_and_reports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = mc.build(tmp_path, sft_steps=5)
    assert not report["skipped"] and mc.build(tmp_path, sft_steps=5)["skipped"]
    v = report["val"]
    for key in ("greedy_acc", "t1_acc", "t1_truncated_frac", "t1_all_right_frac", "t1_all_wrong_frac"):
        assert 0.0 <= v[key] <= 1.0
    assert v["t1_all_right_frac"] + v["t1_all_wrong_frac"] <= 1.0
    assert json.loads((tmp_path / "BUILD_OK").read_text())["sft_steps"] == 5
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert tok.decode(tok.encode("7+5=12;Answer: 12")) == "7+5=12;Answer: 12"
    assert model.config.vocab_size == len(tok)
    rows = [json.loads(line) for line in (tmp_path / "data" / "val.jsonl").read_text().splitlines()]
    assert len(rows) == mc.N_VAL and set(rows[0]) == {"prompt", "answer"}

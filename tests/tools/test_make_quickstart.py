"""tools/make_quickstart.py: a tiny build (5 warm-start steps) has every piece the quickstart relies on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_quickstart.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_quickstart", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mq = _load_tool()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("quickstart")
    threads = torch.get_num_threads()
    report = mq.build(out, sft_steps=5, seed=0)
    assert torch.get_num_threads() == threads  # build() restores the caller's setting
    return out, report


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_and_report(built):
    out, report = built
    for name in ("BUILD_OK", "build_report.json", "data/train.jsonl", "data/val.jsonl", "model/config.json"):
        assert (out / name).is_file(), name
    assert not report["skipped"]
    assert json.loads((out / "build_report.json").read_text())["val"] == report["val"]
    assert report["model_bytes"] < 20e6
    for key in ("greedy_acc", "t1_acc", "t05_acc", "greedy_format", "t1_format"):
        assert 0.0 <= report["val"][key] <= 1.0


def test_data_is_valid_disjoint_and_correct(built):
    out, _ = built
    train = _read_jsonl(out / "data" / "train.jsonl")
    val = _read_jsonl(out / "data" / "val.jsonl")
    assert (len(train), len(val)) == (mq.N_TRAIN, mq.N_VAL)
    for row in train + val:
        assert set(row) == {"prompt", "answer"}
        a, b = row["prompt"].removesuffix("=").split("+")
        assert row["prompt"] == f"{a}+{b}="
        assert row["answer"] == str(int(a) + int(b))
    train_prompts = {r["prompt"] for r in train}
    val_prompts = {r["prompt"] for r in val}
    assert len(train_prompts) == len(train) and len(val_prompts) == len(val)
    assert not train_prompts & val_prompts


def test_data_is_deterministic_from_seed():
    assert mq.make_splits(0, 3) == mq.make_splits(0, 3)
    assert mq.make_splits(0, 3) != mq.make_splits(1, 3)


def test_tokenizer_round_trips_one_token_per_character(built):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out, _ = built
    # AutoTokenizer picks Qwen2Tokenizer for a qwen2 model (transformers 5): all loaders must agree.
    auto = AutoTokenizer.from_pretrained(out / "model")
    fast = PreTrainedTokenizerFast.from_pretrained(out / "model")
    raw = Tokenizer.from_file(str(out / "model" / "tokenizer.json"))
    text = "123+45=" + "Answer: 168" + "\nWhat is 7+8?"
    ids = auto.encode(text)
    assert ids == fast.encode(text) == raw.encode(text).ids
    assert len(ids) == len(text)
    assert [auto.decode([i]) for i in ids] == list(text)
    assert auto.decode(ids) == fast.decode(ids) == text
    assert auto.decode([*ids, auto.eos_token_id, auto.pad_token_id], skip_special_tokens=True) == text
    assert auto.unk_token_id not in ids


def test_special_ids_are_distinct_and_match_the_model(built):
    from transformers import AutoConfig, GenerationConfig

    out, report = built
    config = AutoConfig.from_pretrained(out / "model")
    gen = GenerationConfig.from_pretrained(out / "model")
    ids = report["token_ids"]
    assert len({ids["pad"], ids["eos"], ids["unk"]}) == 3
    assert config.eos_token_id == gen.eos_token_id == ids["eos"]
    assert config.pad_token_id == gen.pad_token_id == ids["pad"]
    assert config.vocab_size == report["vocab_size"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim >= 32  # vLLM crashes below 32


def test_model_loads_and_generates(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert next(model.parameters()).dtype == torch.float32
    assert (out / "model" / "model.safetensors").is_file()
    ids = torch.tensor([tok.encode("12+34=")])
    gen = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    assert gen.shape[0] == 1 and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 4


def test_same_arguments_skip_the_rebuild(built):
    out, report = built
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = mq.build(out, sft_steps=5, seed=0)
    assert time.perf_counter() - start < 1.0
    assert again["skipped"]
    assert again["val"] == report["val"]
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_skip_does_not_import_torch(built):
    out, _ = built
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        str(TOOL),
        "--out",
        str(out),
        "--sft-steps",
        "5",
        "--seed",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "up to date" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "transformers" not in imported


def test_other_arguments_rebuild(built, tmp_path):
    out, _ = built
    (tmp_path / "BUILD_OK").write_text((out / "BUILD_OK").read_text())
    (tmp_path / "build_report.json").write_text((out / "build_report.json").read_text())
    same = asdict(mq.Recipe(sft_steps=5, seed=0))
    assert mq._existing_build(tmp_path, same) is not None
    assert mq._existing_build(tmp_path, asdict(mq.Recipe(sft_steps=6, seed=0))) is None
    assert mq._existing_build(tmp_path, asdict(mq.Recipe(sft_steps=5, seed=1))) is None
    assert mq._existing_build(tmp_path, {**same, "builder_version": -1}) is None


def test_score_uses_the_verifier_rule():
    rows = [{"prompt": "1+2=", "answer": "3"}]
    responses = [[("Answer: 3", True), ("Answer: 4", True), ("Answer: 3 ", False), ("x Answer: 3", True)]]
    # correct: the text after the last "Answer:", stripped, equals "3" -> samples 1, 3, 4
    # well-formed: exactly "Answer: <digits>" and EOS -> samples 1, 2
    assert mq.score(rows, responses) == {"acc": 0.75, "format": 0.5}


def test_target_probability_matches_a_loop(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    rows = _read_jsonl(out / "data" / "val.jsonl")[:3]  # prompts of different lengths -> padding
    expected = []
    for row in rows:
        prompt = tok.encode(row["prompt"])
        response = tok.encode("Answer: " + row["answer"]) + [tok.eos_token_id]
        prob = 1.0
        for i, token in enumerate(response):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response[:i]])).logits[0, -1].double()
            prob *= torch.softmax(logits / 0.7, -1)[token].item()
        expected.append(prob)
    got = mq.target_probability(model, tok, rows, 0.7)
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4)  # float32 forward, batched vs not


def test_noisy_answer():
    rng = mq.random.Random(0)
    assert mq.noisy_answer("1234", rng, 0.0) == "1234"
    noisy = [mq.noisy_answer("55555", rng, 1.0) for _ in range(20)]
    assert all(len(a) == 5 and a.isdigit() for a in noisy)
    assert any(a != "55555" for a in noisy)

"""Dataset presets on small local files shaped like the real ones: DAPO-Math-17k, AIME 2024, MATH jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_pl.data import DataError, PromptDataConfig, render_prompt
from dapo_pl.datasets import DAPO_INSTRUCTION, PRESETS, last_boxed, load_prompts, load_with_report


def _dapo_row(i: int) -> dict[str, object]:
    """One row in DAPO-Math-17k's columns (data_source, chat-message prompt, ability, reward_model, extra_info)."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_INSTRUCTION.format(prompt=f"What is {i}+{i}?")}],
        "ability": "MATH",
        "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"uuid-{i}"},
    }


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dapo_math_17k_is_deduplicated_and_the_count_reported(tmp_path: Path) -> None:
    """Like the release (each prompt 100 times): 200 prompts x 100 copies = 20,000 rows, in more than one
    parquet batch, interleaved -> 200 prompts kept, 19,800 duplicates removed, first copy's row kept."""
    rows = [_dapo_row(i) for _ in range(100) for i in range(200)]
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_with_report(PromptDataConfig(str(path), preset="dapo-math-17k"))
    assert (report.rows, report.prompts, report.duplicates, report.deduped) == (20_000, 200, 19_800, True)
    assert (
        "20,000 rows read, 19,800 duplicates removed (99.0% of the rows), 200 prompts kept"
        in report.summary()
    )
    assert [r.reference for r in records[:3]] == ["0", "2", "4"]
    assert records[5].where == f"{path} row 5" and records[5].prompt[0]["role"] == "user"
    # dedupe: false keeps every copy; limit counts distinct prompts
    assert len(load_prompts(PromptDataConfig(str(path), preset="dapo-math-17k", dedupe=False))) == 20_000
    limited, report = load_with_report(PromptDataConfig(str(path), preset="dapo-math-17k", limit=3))
    assert [r.reference for r in limited] == ["0", "2", "4"] and report.rows == 3


def test_dedupe_without_a_preset_and_prompts_that_differ_only_in_answer(tmp_path: Path) -> None:
    """Copies are equal (prompt, answer) pairs: a prompt repeated with a different answer is kept."""
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "2"}],
    )
    records, report = load_with_report(PromptDataConfig(str(path), dedupe=True))
    assert [(r.prompt, r.reference) for r in records] == [("a", "1"), ("a", "2")]
    assert (report.duplicates, report.rows) == (1, 3)
    _, plain = load_with_report(PromptDataConfig(str(path)))
    assert (plain.duplicates, plain.deduped) == (0, False)


def test_aime_2024_in_dapo_layout_repeated_32_times(tmp_path: Path) -> None:
    """DAPO's aime-2024.parquet repeats each problem 32 times (one sample each = avg@32); K comes from
    val_rollout.n here, so the preset keeps one copy: 3 problems x 32 -> 3 prompts."""
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_INSTRUCTION.format(prompt=f"AIME problem {i}")}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(100 + i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": i},
        }
        for _ in range(32)
        for i in range(3)
    ]
    path = tmp_path / "aime-2024.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_with_report(PromptDataConfig(str(path), preset="aime-2024"))
    assert [r.reference for r in records] == ["100", "101", "102"] and report.duplicates == 93


def test_aime_2024_as_problem_answer_jsonl_gets_dapos_instruction(tmp_path: Path) -> None:
    """The common AIME_2024 jsonl (ID, Problem, Solution, Answer as an int) becomes one user message."""
    path = _jsonl(
        tmp_path / "aime.jsonl",
        [{"ID": "2024-I-1", "Problem": "Find $x$.", "Solution": "...", "Answer": 204}],
    )
    (record,) = load_prompts(PromptDataConfig(str(path), preset="aime-2024"))
    assert record.reference == "204"
    assert record.prompt == [{"role": "user", "content": DAPO_INSTRUCTION.format(prompt="Find $x$.")}]
    assert "Find $x$." in record.prompt[0]["content"] and 'after "Answer:"' in record.prompt[0]["content"]
    # a template replaces the instruction; other fields of the row may be named
    (custom,) = load_prompts(PromptDataConfig(str(path), preset="aime-2024", template="[{ID}] {prompt}"))
    assert custom.prompt == [{"role": "user", "content": "[2024-I-1] Find $x$."}]


def test_math_jsonl_answer_field_or_last_boxed_of_the_solution(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "level": "Level 1"},  # MATH-500
            {
                "problem": "P",
                "solution": "First $\\boxed{3}$, then $\\boxed{\\frac{a}{b^{2}}}$.",
                "type": "Algebra",
            },
        ],
    )
    records = load_prompts(PromptDataConfig(str(path), preset="math"))
    assert [r.reference for r in records] == ["\\frac{1}{2}", "\\frac{a}{b^{2}}"]
    assert records[1].where == f"{path}:2"


def test_last_boxed() -> None:
    assert last_boxed("a \\boxed{1} b \\boxed{x^{2}+1}") == "x^{2}+1"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{1} and \\boxed{2") is None  # an unclosed last box is no answer


def test_bad_rows_and_misuse_are_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"problem": "P", "solution": "no box here"}])
    with pytest.raises(DataError, match=rf"{path}:1: no 'answer' field and no \\boxed"):
        load_prompts(PromptDataConfig(str(path), preset="math"))
    path = _jsonl(tmp_path / "a.jsonl", [{"question_text": "P", "Answer": 1}])
    with pytest.raises(DataError, match=rf"{path}:1: no problem text .*the row has: Answer, question_text"):
        load_prompts(PromptDataConfig(str(path), preset="aime-2024"))
    with pytest.raises(DataError, match="preset 'math' decides the row layout; remove answer_field"):
        load_prompts(PromptDataConfig(str(path), preset="math", answer_field="solution"))
    with pytest.raises(ValueError, match="unknown dataset preset 'dapo'; choose one of dapo-math-17k"):
        PromptDataConfig(str(path), preset="dapo")  # fails when the config is built


def test_presets_are_described() -> None:
    assert set(PRESETS) == {"dapo-math-17k", "aime-2024", "math"}
    assert all(p.description for p in PRESETS.values())


def test_chat_messages_are_rendered_by_the_tokenizers_chat_template(tmp_path: Path) -> None:
    """A preset's records are chat messages; the tokenizer's own chat template turns them into token ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("<>|abcdefghijklmnopqrstuvwxyzAIMEP0123456789 ?$.:\"'+\n"))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = _jsonl(tmp_path / "aime.jsonl", [{"problem": "what is 2+2?", "answer": "4"}])
    (record,) = load_prompts(PromptDataConfig(str(path), preset="aime-2024", template="{prompt}?"))
    ids = render_prompt(record, tokenizer)
    assert tokenizer.decode(ids).replace(" ", "") == "<|user|>whatis2+2??\n<|assistant|>"


def test_data_does_not_import_datasets() -> None:
    """The presets build on dapo_pl.data; dapo_pl.data never imports dapo_pl.datasets (no import cycle)."""
    import ast

    import dapo_pl.data

    tree = ast.parse(Path(dapo_pl.data.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert "dapo_pl.datasets" not in imported
    assert set(dapo_pl.data.PRESET_NAMES) == set(PRESETS)

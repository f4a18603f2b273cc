"""Prompt loading from local jsonl / json / parquet / saved `datasets` folders, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_pl.data import DataError, PromptDataConfig
from dapo_pl.datasets import load_prompts


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_template_and_extra_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "p.jsonl", [{"q": "1+1", "a": 2, "level": "easy"}, {"q": "2+2", "a": "4", "level": "hard"}]
    )
    records = load_prompts(
        PromptDataConfig(str(path), prompt_field="q", answer_field="a", template="[{level}] {prompt}=")
    )
    assert [(r.prompt, r.reference) for r in records] == [("[easy] 1+1=", "2"), ("[hard] 2+2=", "4")]
    assert records[1].where == f"{path}:2"


def test_missing_answer_names_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "solution": "2"}])
    with pytest.raises(DataError, match=rf"{path}:2: no field 'answer' \(the row has: prompt, solution\)"):
        load_prompts(PromptDataConfig(str(path)))


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_prompts(PromptDataConfig(str(path)))


def test_empty_answer_and_missing_file_and_empty_dataset(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "  "}])
    with pytest.raises(DataError, match="answer field 'answer' is empty"):
        load_prompts(PromptDataConfig(str(path)))
    with pytest.raises(DataError, match="not found"):
        load_prompts(PromptDataConfig(str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(PromptDataConfig(str(_jsonl(tmp_path / "e.jsonl", []))))


def test_template_naming_a_missing_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(DataError, match=r"template .* names missing field\(s\) \['topic'\]"):
        load_prompts(PromptDataConfig(str(path), template="{topic}: {prompt}"))


def test_parquet_with_nested_answer_and_chat_messages(tmp_path: Path) -> None:
    """DAPO-Math-17k's shape: prompt as chat messages, answer in reward_model.ground_truth."""
    rows = [
        {
            "prompt": [{"role": "user", "content": "What is 3+4?"}],
            "reward_model": {"ground_truth": "7", "style": "rule"},
        },
        {
            "prompt": [{"role": "user", "content": "What is 5+5?"}],
            "reward_model": {"ground_truth": "10", "style": "rule"},
        },
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_prompts(PromptDataConfig(str(path), answer_field="reward_model.ground_truth"))
    assert records[1].prompt == [{"role": "user", "content": "What is 5+5?"}]
    assert records[1].reference == "10" and records[1].where == f"{path} row 1"
    with pytest.raises(DataError, match=rf"{path} row 0: no field 'reward_model.answer'"):
        load_prompts(PromptDataConfig(str(path), answer_field="reward_model.answer"))


def test_json_list_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": str(i), "answer": str(i)} for i in range(5)]), encoding="utf-8")
    assert [r.prompt for r in load_prompts(PromptDataConfig(str(path), limit=2))] == ["0", "1"]


def test_saved_datasets_folder_and_load_dataset_folder(tmp_path: Path) -> None:
    """The `datasets` paths: a save_to_disk folder, and load_dataset on a local data folder (as for a hub name)."""
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "x", "answer": "1"}, {"prompt": "y", "answer": "2"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [r.reference for r in load_prompts(PromptDataConfig(str(tmp_path / "saved")))] == ["1", "2"]
    folder = tmp_path / "hub_like"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": "z", "answer": "3"}])
    assert [r.prompt for r in load_prompts(PromptDataConfig(str(folder), split="train"))] == ["z"]

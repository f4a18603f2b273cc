"""``dapo-pl verify`` / ``dapo-pl verifiers`` (dapo_pl.verify_cmd): the contract in DESIGN.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dapo_pl import verify_cmd


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verify(tmp_path: Path, rows: list[Any], *extra: str) -> tuple[int, list[dict[str, Any]]]:
    src, dst = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    code = verify_cmd.main(["verify", "--input", str(src), "--output", str(dst), "--no-progress", *extra])
    return code, read_jsonl(dst) if dst.exists() else []


def test_scores_and_passes_fields_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"id": 1, "response": "so $\\boxed{\\frac12}$", "reference": "0.5", "tags": ["a"]},
        {"id": 2, "response": "Answer: 7", "reference": 8},
        {"id": 3, "response": "\\boxed{2\\sqrt2}", "reference": "\\sqrt8"},
        {"id": 4, "response": "no idea", "reference": "1"},
    ]
    code, out = verify(tmp_path, rows, "--verifier", "math_equivalence")
    assert code == 0
    assert [r["id"] for r in out] == [1, 2, 3, 4] and out[0]["tags"] == ["a"]
    assert [r["correct"] for r in out] == [True, False, True, False]
    assert [r["reward"] for r in out] == [1.0, -1.0, 1.0, -1.0]
    assert [r["extracted"] for r in out] == ["\\frac12", "7", "2\\sqrt2", None]
    assert out[0]["error"] is None and "no final answer" in out[3]["error"]
    summary = capsys.readouterr().err
    assert "verified 4 lines" in summary and "correct 2 / judged 4 (accuracy 50.0%)" in summary


def test_first_verifier_decides_the_others_add_rewards(tmp_path: Path) -> None:
    rows = [{"response": "\\boxed{3}", "reference": "3", "response_length": 90, "max_response_length": 100}]
    args = [
        "--verifier",
        "math_equivalence",
        "--verifier",
        "overlong",
        "--options",
        'overlong={"cache_len": 20}',
    ]
    code, out = verify(tmp_path, rows, *args)
    assert code == 0
    # overlong: 90 tokens, L_max 100, L_cache 20 -> (80 - 90) / 20 = -0.5, added to +1
    assert out[0]["reward"] == pytest.approx(0.5) and out[0]["correct"] is True


def test_bad_lines_are_written_through_with_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"response": "Answer: 1", "reference": "1"},
        "{not json",
        [1, 2],
        {"reference": "1"},
        {"response": 5, "reference": "5"},
        {"response": "Answer: 1", "reference": {"a": 1}},
        "",
        {"response": "Answer: 2", "reference": "2"},
    ]
    code, out = verify(tmp_path, rows, "--verifier", "math_equivalence")
    assert code == 0
    assert len(out) == 7  # blank lines are skipped, every other line comes back
    assert out[0]["correct"] is True and out[-1]["correct"] is True
    bad = out[1:6]
    assert all(r["reward"] == 0.0 and r["correct"] is None for r in bad)
    name = str(tmp_path / "in.jsonl")
    assert bad[0]["_raw"] == "{not json" and bad[0]["error"].startswith(f"{name}:2: not valid JSON")
    assert bad[1]["error"] == f"{name}:3: expected a JSON object, got list"
    assert bad[2]["error"] == f"{name}:4: field 'response' is missing"
    assert bad[3]["error"] == f"{name}:5: field 'response' must be a string, not int"
    assert "field 'reference'" in bad[4]["error"]
    assert "bad input lines: 5" in capsys.readouterr().err


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = verify(tmp_path, [], "--verifier", "no_such_verifier")
    assert code == 2 and "unknown verifier 'no_such_verifier'" in capsys.readouterr().err
    code, _ = verify(tmp_path, [], "--verifier", "math_equivalence", "--options", "math_equivalence=[1]")
    assert code == 2
    code, _ = verify(
        tmp_path, [], "--verifier", "math_equivalence", "--options", 'math_equivalence={"bogus": 1}'
    )
    assert code == 2 and "bad options" in capsys.readouterr().err
    missing = [
        "verify",
        "--verifier",
        "exact_match",
        "--input",
        str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert verify_cmd.main(missing) == 1


def test_a_slow_line_costs_at_most_the_time_limit(tmp_path: Path) -> None:
    rows = [
        {"response": "\\boxed{e^{e^{e^{e^{x}}}}}", "reference": "x"},
        {"response": "\\boxed{4}", "reference": "4"},
    ]
    opts = 'math_equivalence={"timeout_s": 0.5, "num_workers": 1}'
    code, out = verify(tmp_path, rows, "--verifier", "math_equivalence", "--options", opts)
    assert code == 0 and "timed out" in out[0]["error"] and out[1]["correct"] is True


def test_many_lines_with_progress(tmp_path: Path) -> None:
    rows = [{"response": f"Answer: {k}", "reference": str(k)} for k in range(1500)]
    src, dst = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert (
        verify_cmd.main(
            ["verify", "--verifier", "math_equivalence", "--input", str(src), "--output", str(dst)]
        )
        == 0
    )
    assert all(r["correct"] for r in read_jsonl(dst))


def test_list_verifiers(capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_cmd.main(["verifiers"]) == 0
    table = capsys.readouterr().out
    for name in ("exact_match", "overlong", "math_equivalence"):
        assert f"{name} (dapo-pl)" in table
    assert verify_cmd.main(["verifiers", "--json"]) == 0
    listed = {v["name"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed["math_equivalence"]["plugin"] == "math_equivalence (dapo-pl)"
    assert listed["math_equivalence"]["description"]


def test_python_dash_m_entry(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"response": "Answer: 3", "reference": "3"}])
    dst = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "dapo_pl.verify_cmd",
        "verify",
        "--verifier",
        "exact_match",
        "--input",
        str(src),
    ]
    run = subprocess.run([*cmd, "--output", str(dst)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_jsonl(dst)[0]["correct"] is True and "verified 1 lines" in run.stderr

"""``dapo-pl verify`` / ``dapo-pl verifiers`` (dapo_pl.verify_cmd): the contract in DESIGN.md."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dapo_pl import verify_cmd
from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import (
    PLUGINS_ENV,
    CheckedVerifier,
    Verdict,
    get_plugin_manager,
    reset_plugin_manager,
)


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
    assert len(out) == 8  # one output line per input line, the blank one included
    assert out[0]["correct"] is True and out[-1]["correct"] is True
    bad = out[1:7]
    assert all(r["reward"] == 0.0 and r["correct"] is None for r in bad)
    name = str(tmp_path / "in.jsonl")
    assert bad[0]["_raw"] == "{not json" and bad[0]["error"].startswith(f"{name}:2: not valid JSON")
    assert bad[1]["error"] == f"{name}:3: expected a JSON object, got list"
    assert bad[2]["error"] == f"{name}:4: field 'response' is missing"
    assert bad[3]["error"] == f"{name}:5: field 'response' must be a string, not int"
    assert "field 'reference'" in bad[4]["error"]
    assert bad[5] == {
        "_raw": "",
        "reward": 0.0,
        "correct": None,
        "extracted": None,
        "error": f"{name}:7: blank line",
    }
    summary = capsys.readouterr().err
    assert "lines with an error: 6 (bad input lines: 6;" in summary and "     1  blank line" in summary


def _lines_in_and_out(tmp_path: Path, data: bytes, *extra: str) -> tuple[list[bytes], list[dict[str, Any]]]:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    args = ["verify", "--input", str(src), "--output", str(dst), "--no-progress", "--batch-size", "4"]
    args += list(extra or ("--verifier", "exact_match"))
    assert verify_cmd.main(args) == 0
    return data.splitlines(), [json.loads(line) for line in dst.read_bytes().decode("utf-8").splitlines()]


def test_any_bytes_give_one_output_line_each_in_order(tmp_path: Path) -> None:
    """Invalid UTF-8, a lone surrogate escape, blank and whitespace lines, deep nesting and a line without a final
    newline: each input line has its output line at the same place, the good ones scored."""
    good = b'{"id": %d, "response": "Answer: 4", "reference": "4"}'
    data = b"\n".join([
        good % 1,
        b'{"response": "caf\xe9 \xff", "reference": "4"}',  # latin-1 bytes: not UTF-8
        good % 2,
        b'{"response": "Answer: \\ud800", "reference": "4"}',  # JSON escape of a lone surrogate
        b"   ",
        b"",
        b"[" * 100_000,
        good % 3,
        b'{"response": "Answer: \xc3\xa9", "reference": "\xc3\xa9"}',  # valid UTF-8 passes
        good % 4,  # no newline at the end
    ])  # fmt: skip
    lines, out = _lines_in_and_out(tmp_path, data)
    assert len(out) == len(lines) == 10
    assert [r.get("id") for r in out if "id" in r] == [1, 2, 3, 4]
    assert [i for i, r in enumerate(out) if r["correct"]] == [0, 2, 7, 8, 9]
    errors = {i: r["error"] for i, r in enumerate(out) if r["error"]}
    name = str(tmp_path / "in.jsonl")
    assert errors[1] == f"{name}:2: not UTF-8 (byte 0xe9 at offset 17)"
    assert out[1]["_raw"] == '{"response": "caf\\xe9 \\xff", "reference": "4"}'  # kept, escaped
    assert errors[3] == f"{name}:4: contains a lone surrogate escape \\ud800, which is not valid Unicode"
    assert out[3]["_raw"] == lines[3].decode()
    assert errors[4] == f"{name}:5: blank line" and errors[5] == f"{name}:6: blank line"
    assert errors[6] == f"{name}:7: not valid JSON (nested too deeply)"
    assert sorted(errors) == [1, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"response_length": "long"}, "field 'response_length' must be an integer (or null), not \"long\""),
        ({"response_length": 3.5}, "field 'response_length' must be an integer (or null), not 3.5"),
        ({"response_length": True}, "field 'response_length' must be an integer (or null), not true"),
        ({"response_length": -1}, "field 'response_length' must be >= 0, not -1"),
        ({"max_response_length": "x"}, "field 'max_response_length' must be an integer (or null), not \"x\""),
        ({"truncated": "yes"}, "field 'truncated' must be true/false (or null), not \"yes\""),
        ({"prompt": 7}, "field 'prompt' must be a string (or null), not 7"),
    ],
)
def test_a_bad_field_fails_its_line_not_the_batch(
    tmp_path: Path, fields: dict[str, Any], problem: str
) -> None:
    """With ``overlong`` a non-numeric ``response_length`` used to crash the verifier and lose the whole batch."""
    ok = {"response": "Answer: 4", "reference": "4", "response_length": 10, "max_response_length": 20}
    rows = [ok, {**ok, **fields}, ok]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _, out = _lines_in_and_out(
        tmp_path,
        data,
        "--verifier",
        "exact_match",
        "--verifier",
        "overlong",
        "--options",
        'overlong={"cache_len": 5}',
    )
    assert [r["correct"] for r in out] == [True, None, True]
    assert [r["reward"] for r in out] == [1.0, 0.0, 1.0]
    assert out[1]["error"] == f"{tmp_path / 'in.jsonl'}:2: {problem}"


class _RaisingPlugin:
    """A verifier plugin registered in the test: raises on any batch that holds a response containing "boom"."""

    @hookimpl
    def register_verifiers(self, register: Any) -> None:
        def judge(samples: Any) -> list[Verdict]:
            if any("boom" in s.response for s in samples):
                raise ValueError("cannot parse boom")
            return [
                Verdict(1.0 if s.response == s.reference else -1.0, s.response == s.reference)
                for s in samples
            ]

        register("raises_on_boom", lambda **_: judge, "test verifier that raises")


@pytest.fixture()
def raising_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_plugin_manager()
    get_plugin_manager().register(_RaisingPlugin(), name="raising-plugin")
    yield
    reset_plugin_manager()


def test_a_raising_verifier_loses_no_line(
    tmp_path: Path, raising_plugin: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 lines in batches of 4, "boom" at lines 5 and 14 (batches 2 and 4): 20 lines come out, in order; the
    8 lines of those two batches name the verifier and its plugin (the guarded call shared with training,
    :meth:`dapo_pl.verification.CheckedVerifier.score`, fails a raising batch as a whole); every line of the
    other batches is scored. (It used to write 4 lines.)"""
    rows = [
        {"id": i, "response": "boom" if i in (5, 14) else str(i % 3), "reference": "1"} for i in range(20)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _, out = _lines_in_and_out(tmp_path, data, "--verifier", "raises_on_boom")
    assert [r["id"] for r in out] == list(range(20))
    failed = set(range(4, 8)) | set(range(12, 16))
    for i in failed:
        assert "verifier 'raises_on_boom' (plugin raising-plugin)" in out[i]["error"]
        assert "cannot parse boom" in out[i]["error"]
        assert out[i]["correct"] is not True
    assert [r["correct"] for r in out if r["error"] is None] == [
        i % 3 == 1 for i in range(20) if i not in failed
    ]
    assert "lines a verifier could not judge: 8)" in capsys.readouterr().err


def test_output_equal_to_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same file, by name, through a symlink and through a hard link: refused, exit 2, input untouched."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"response": "Answer: 1", "reference": "1"}] * 10)
    before = src.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path / "." / "in.jsonl"):
        args = ["verify", "--verifier", "exact_match", "--input", str(src), "--output", str(out)]
        assert verify_cmd.main(args) == 2
        assert "is the input file" in capsys.readouterr().err
        assert src.read_bytes() == before


def test_output_replaces_the_old_file_only_at_the_end(
    tmp_path: Path, raising_plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted mid-run (Ctrl-C inside the verifier, after a first batch was written): OUT keeps its old
    content and no temporary file is left; a complete run then replaces OUT, keeping its permissions."""
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"response": "1", "reference": "1"}] * 6 + [{"response": "boom"}]
    )
    dst = tmp_path / "out.jsonl"
    dst.write_text("old\n")
    dst.chmod(0o640)
    args = [
        "verify",
        "--verifier",
        "raises_on_boom",
        "--input",
        str(src),
        "--output",
        str(dst),
        "--batch-size",
        "2",
    ]
    calls = []
    original = CheckedVerifier.score

    def interrupted(verifier: Any, samples: Any, failed: Any) -> Any:
        calls.append(len(samples))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(verifier, samples, failed)

    monkeypatch.setattr(CheckedVerifier, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify_cmd.main(args)
    assert dst.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
    ]
    monkeypatch.setattr(CheckedVerifier, "score", original)
    assert verify_cmd.main(args) == 0
    assert len(read_jsonl(dst)) == 7 and stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_kill_9_mid_run_leaves_the_old_output(tmp_path: Path) -> None:
    """A real ``dapo-pl verify`` process killed with SIGKILL while it writes: OUT is still the old file."""
    rows = [{"response": f"\\boxed{{{k}}}", "reference": str(k)} for k in range(20_000)]
    src, dst = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    dst.write_text("old\n")
    cmd = [sys.executable, "-m", "dapo_pl", "verify", "--verifier", "math_equivalence", "--batch-size", "64"]
    # its own session, so that the kill reaches the verifier's worker processes too
    proc = subprocess.Popen(
        [*cmd, "--input", str(src), "--output", str(dst), "--no-progress"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]:
            assert proc.poll() is None and time.monotonic() < deadline, "no partial output appeared"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert dst.read_text() == "old\n"


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

"""tools/bench_train.py's pieces that decide its numbers (the benchmark itself is run by hand, never timed here)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from tool_loading import load_tool

bench = load_tool("bench_train")


def test_the_models_are_the_issues_sizes(tmp_path: Path) -> None:
    """tiny: 2 x (attention 4*32*128*2 + kv 2*2*32*128 + biases 256 + MLP 3*128*256 + norms 256) + 259*128 + 128
    = 329,216; the ~9.5M model counts 9,545,472; both tied, with the 259-token quickstart vocabulary."""
    from transformers import AutoModelForCausalLM

    assert bench.num_params(bench.MODELS["tiny"]) == 329_216
    assert bench.num_params(bench.MODELS["9.5m"]) == 9_545_472
    model = AutoModelForCausalLM.from_pretrained(bench.build_model(bench.MODELS["tiny"], tmp_path / "m"))
    assert sum(p.numel() for p in model.parameters()) == 329_216
    assert model.config.tie_word_embeddings and model.config.vocab_size == 259


def test_prompts_are_512_distinct_sums(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in bench.write_prompts(tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 512 == len({r["prompt"] for r in rows})
    a, b = rows[0]["prompt"].rstrip("=").split("+")
    assert int(rows[0]["answer"]) == int(a) + int(b)


def _run(runner: str, steps: int, loop_s: float, repeat: int = 0) -> dict:
    return {"model": "tiny", "runner": runner, "steps": steps, "repeat": repeat, "loop_s": loop_s}


def test_per_step_time_is_the_long_minus_short_loop_over_the_extra_steps() -> None:
    """(12.0 - 4.0) / (6 - 2) = 2.0 and (10.0 - 5.0) / 4 = 1.25; a failed run drops its pair."""
    results = [_run("ours", 2, 4.0), _run("ours", 6, 12.0), _run("ours", 2, 5.0, 1), _run("ours", 6, 10.0, 1)]
    assert bench.per_step_times(results, "tiny", "ours", 2, 6) == [2.0, 1.25]
    results[1]["error"] = "exit 1"
    assert bench.per_step_times(results, "tiny", "ours", 2, 6) == [1.25]


def test_speed_table_reports_phases_and_the_truncated_share() -> None:
    """Per-step (2.0 s), TRL / ours (4.0 / 2.0), the phase means over the long run's steps after the first, and
    the truncated share (masked by overlong filtering, skipped by the update): (0.5 + 1.0) / 2 = 75%."""
    step = dict.fromkeys(("rollout", "reward", "old_logprob", "update", "sync", "wall"), 1.0)
    log = [{**step, "logprob_gap": 1e-7, "truncated": t} for t in (0.0, 0.5, 1.0)]
    results = [_run("ours-transformers", 2, 4.0), _run("trl", 2, 5.0), {**_run("trl", 6, 21.0), "step_s": [9, 4, 4]},
               {**_run("ours-transformers", 6, 12.0), "step_log": log}]  # fmt: skip
    for r in results:
        r["peak_rss_mb"] = 100.0
    args = Namespace(models=["tiny"], runners=["ours-transformers"], peer="trl", short=2, long=6)
    ours, trl = bench.speed_table(results, args).splitlines()[2:]
    assert ours.startswith("| tiny | ours-transformers | 2.000 (2.000-2.000) | 64 | 2.00x |")
    assert "| 1.0e-07 | 75% | 100 (-) |" in ours
    assert "| - | - | 100 (-) |" in trl


def test_memory_table_marks_oom_and_reports_growth() -> None:
    args = Namespace(vocabs=[8192], tokens=[2048, 8192], limit_gb=6.0)
    results = [
        {"vocab": 8192, "tokens": 2048, "oom": False, "peak_rss_mb": 1000.0, "cgroup_peak_mb": 900.0},
        {"vocab": 8192, "tokens": 8192, "oom": False, "peak_rss_mb": 1100.0, "cgroup_peak_mb": 950.0},
    ]
    assert "| +10% |" in bench.memory_table(results, args)
    results[1].update(oom=True, error="exit -9")
    row = bench.memory_table(results, args).splitlines()[-1]
    assert "OOM (> 6 GB cgroup)" in row and row.endswith("| - |")


def test_long_must_exceed_short() -> None:
    with pytest.raises(SystemExit, match="--long must be larger"):
        bench.main(["--short", "3", "--long", "3"])


def test_overlong_filtering_is_on_by_default_and_can_be_turned_off_for_equal_work() -> None:
    assert bench.parse_args([]).overlong_filtering is True
    assert bench.parse_args(["--no-overlong-filtering"]).overlong_filtering is False

"""tools/run_ablation.py: seeded run names group back into rows, and the summary carries the grouped table."""

from __future__ import annotations

from pathlib import Path

from tool_loading import load_tool

from dapo_pl.compare import RunData
from dapo_pl.compare_groups import group_key, make_groups, write_group_markdown

REPO = Path(__file__).resolve().parents[2]


ra = load_tool("run_ablation")


def _run(name: str, final: float) -> RunData:
    return RunData(
        run_id=name.ljust(32, "0"), name=name, label=name, experiment="ablation-chain", status="FINISHED",
        params={"seed_everything": name[-1], "model.algorithm.eps_high": "0.2"}, metric_keys={"val/acc_avg_at_4"},
        curves={"val/acc_avg_at_4": [(48, final)]},
    )  # fmt: skip


def test_seeded_names_group_back_into_their_row(tmp_path: Path) -> None:
    rows = sorted((REPO / "configs" / "ablation" / "chain").glob("*.yaml"))
    assert len(rows) == 6
    experiment, name = ra.row_identity(rows[0])
    assert (experiment, name) == ("ablation-chain", "1-naive-grpo")
    runs = [_run(ra.seeded_name(name, seed), 0.2 + 0.1 * seed) for seed in (0, 1, 2)]
    assert [r.name for r in runs] == ["1-naive-grpo-s0", "1-naive-grpo-s1", "1-naive-grpo-s2"]
    assert {group_key(r, "run_name") for r in runs} == {"1-naive-grpo"}

    groups = make_groups(runs, ["val/acc_avg_at_4"], "run_name")
    md = tmp_path / "comparison.md"
    write_group_markdown(md, groups, ["val/acc_avg_at_4"], "run_name", "sqlite:///x.db")
    table = ra.metrics_table_of(md)
    assert (
        table[0] == "| group | runs | val/acc_avg_at_4 |"
        and table[2] == "| 1-naive-grpo | 3 | 0.3 ± 0.25 (3 seeds) |"
    )
    summary = ra.write_summary(tmp_path, rows[:1], [0, 1, 2], {f"1_naive_grpo-s{s}": 60.0 for s in (0, 1, 2)},
                               "sqlite:///x.db", table, [], [3.0, 5.0])  # fmt: skip
    text = summary.read_text(encoding="utf-8")
    assert (
        "Wall time of the fits: 3.0 min (each fit's time summed: 3.0 min)" in text
        and "3.0 to 5.0, mean 4.0" in text
    )
    assert "| 1-naive-grpo | `1_naive_grpo.yaml` | 1.0 / 1.0 / 1.0 min |" in text and table[2] in text

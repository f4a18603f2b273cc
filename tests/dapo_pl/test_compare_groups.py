"""`dapo-pl compare --group-by`: 2 groups x 3 seeds logged to a real sqlite MLflow store, aggregated into mean, std
and 95% CI per group, written as CSV, Markdown and PNGs with bands; hand-computed numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from dapo_pl.cli import main
from dapo_pl.compare import CompareError, compare
from dapo_pl.compare_groups import band, plot_group_metric, summarize, t_quantile

# Final val/acc_avg_at_4 per seed: grpo 0.2, 0.3, 0.4 (mean 0.3, std 0.1); dapo 0.5, 0.5, 0.8 (mean 0.6,
# std sqrt(((-0.1)^2 * 2 + 0.2^2) / 2) = sqrt(0.03)). Half-width of the 95% CI: t(0.975, 2) * std / sqrt(3) with
# t = 4.302653: grpo 0.248414, dapo 0.430265 (= 4.302653 * 0.1732051 / 1.7320508).
FINALS = {"grpo": [0.2, 0.3, 0.4], "dapo": [0.5, 0.5, 0.8]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'runs.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("ablation")
    ids = []
    for name, eps_high in (("grpo", "0.2"), ("dapo", "0.28")):
        for seed, final in enumerate(FINALS[name]):
            rid = client.create_run(exp, run_name=f"{name}-s{seed}", tags={"row": name}).info.run_id
            ids.append(rid)
            params = {"model.algorithm.eps_high": eps_high, "seed_everything": str(seed),
                      "seeds.rollout": str(1000 + seed), "data.val_rollout.seed": "None"}  # fmt: skip
            for key, value in params.items():
                client.log_param(rid, key, value)
            client.log_metric(rid, "val/acc_avg_at_4", 0.1, step=0, timestamp=1)
            client.log_metric(rid, "val/acc_avg_at_4", final, step=10, timestamp=2)
            client.log_metric(rid, "train/acc", final / 2, step=10, timestamp=2)
            client.set_terminated(rid)
    return {"uri": uri, "ids": ids}


def test_t_quantile_and_summary_hand_worked() -> None:
    assert t_quantile(2) == 4.302653 and t_quantile(1) == 12.706205
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in (1, 2, 5, 30, 31, 45, 200):
        assert t_quantile(df) == pytest.approx(scipy_t.ppf(0.975, df), rel=2e-6)
    s = summarize([0.2, 0.3, 0.4])
    assert s is not None and s.n == 3
    assert s.mean == pytest.approx(0.3, abs=1e-15) and s.std == pytest.approx(0.1, abs=1e-15)
    assert s.mean - s.low == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-12)
    one = summarize([0.7, float("nan")])
    assert one is not None and (one.n, one.mean, one.std, one.low) == (1, 0.7, None, None)
    assert summarize([]) is None


def test_two_groups_of_three_seeds_write_csv_markdown_and_banded_pngs(
    store: dict[str, Any], tmp_path: Path
) -> None:
    result = compare(store["ids"], tmp_path, metrics=["val/acc_avg_at_4", "train/acc"], tracking_uri=store["uri"],
                     group_by="run_name")  # fmt: skip
    assert [g.name for g in result.groups] == ["grpo", "dapo"]
    with (tmp_path / "comparison.csv").open(encoding="utf-8") as fh:
        rows = {r["group"]: r for r in csv.DictReader(fh)}
    grpo, dapo = rows["grpo"], rows["dapo"]
    assert grpo["runs"] == "grpo-s0 grpo-s1 grpo-s2" and grpo["val/acc_avg_at_4:n"] == "3"
    assert float(grpo["val/acc_avg_at_4:mean"]) == pytest.approx(0.3, abs=1e-12)
    assert float(grpo["val/acc_avg_at_4:std"]) == pytest.approx(0.1, abs=1e-12)
    assert float(grpo["val/acc_avg_at_4:ci_low"]) == pytest.approx(0.3 - 0.248414, abs=1e-6)
    assert float(dapo["val/acc_avg_at_4:ci_high"]) == pytest.approx(0.6 + 0.430265, abs=1e-6)
    assert float(dapo["train/acc:mean"]) == pytest.approx(0.3, abs=1e-12)

    md = (tmp_path / "comparison.md").read_text(encoding="utf-8")
    assert "| grpo | 3 | 0.3 ± 0.25 (3 seeds) | 0.15 ± 0.12 (3 seeds) |" in md
    assert "| dapo | 3 | 0.6 ± 0.43 (3 seeds) |" in md
    for name in ("val_acc_avg_at_4.png", "train_acc.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 5000
    # The band: at step 0 every run logged 0.1 (zero width), at step 10 the group's interval.
    points = band(result.groups[0].runs, "val/acc_avg_at_4")
    assert [(step, s.mean) for step, s in points] == [(0, pytest.approx(0.1)), (10, pytest.approx(0.3))]
    assert points[0][1].low == pytest.approx(0.1) and points[1][1].low == pytest.approx(
        0.3 - 0.248414, abs=1e-6
    )
    fig = plot_group_metric(result.groups, "val/acc_avg_at_4")
    from matplotlib.collections import PolyCollection

    filled = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]  # one band per group
    assert len(filled) == 2


def test_group_by_a_param_or_a_tag_and_the_command_line(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_param = compare(store["ids"], tmp_path / "p", metrics=["val/*"], tracking_uri=store["uri"],
                       group_by="model.algorithm.eps_high")  # fmt: skip
    assert [(g.name, len(g.runs)) for g in by_param.groups] == [("0.2", 3), ("0.28", 3)]
    by_tag = compare(store["ids"], tmp_path / "t", tracking_uri=store["uri"], group_by="tag:row")
    assert [g.name for g in by_tag.groups] == ["grpo", "dapo"]
    code = main(["compare", *store["ids"], "--out", str(tmp_path / "cli"), "--tracking-uri", store["uri"],
                 "--metrics", "val/acc_avg_at_4", "--group-by", "run_name"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "2 groups by run_name" in out and "| dapo | 3 | 0.6 ± 0.43 (3 seeds) |" in out


def test_a_group_that_differs_in_more_than_its_seed_is_refused(store: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(
        CompareError, match=r"group '0' .* differ in more than their seed: model.algorithm.eps_high"
    ):
        compare(store["ids"], tmp_path, tracking_uri=store["uri"], group_by="seed_everything")
    with pytest.raises(CompareError, match="has no param 'eps_high' .*similar: model.algorithm.eps_high"):
        compare(store["ids"], tmp_path, tracking_uri=store["uri"], group_by="eps_high")
    with pytest.raises(CompareError, match="has no tag 'nope'"):
        compare(store["ids"], tmp_path, tracking_uri=store["uri"], group_by="tag:nope")

"""`dapo-pl compare` on runs logged to a local sqlite MLflow store (the real server is in test_mlflow_server.py),
and the ablation configs it is meant for: each row differs from the previous one only in its technique."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dapo_pl.cli import main
from dapo_pl.compare import (
    CompareError,
    compare,
    curve,
    differing_params,
    final_and_best,
    plot_metric,
    select_metrics,
)

REPO = Path(__file__).resolve().parents[2]

# Two runs: GRPO-like (eps_high 0.2) and DAPO-like (eps_high 0.28); val every 10 steps, train every step.
VAL_A = {0: 0.25, 10: 0.5, 20: 0.375}  # final 0.375, best 0.5
VAL_B = {0: 0.25, 10: 0.375, 20: 0.625}  # final = best = 0.625


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'runs.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("ablation")
    other = client.create_experiment("other")
    ids = {}
    for name, eps_high, val in (("grpo", "0.2", VAL_A), ("dapo", "0.28", VAL_B)):
        run = client.create_run(exp, run_name=name)
        rid = run.info.run_id
        ids[name] = rid
        for key, value in {"model.algorithm.eps_high": eps_high, "model.optim.lr": "0.0001"}.items():
            client.log_param(rid, key, value)
        for step, value in val.items():
            client.log_metric(rid, "val/acc_avg_at_4", value, step=step, timestamp=1000 + step)
            client.log_metric(rid, "val/pass_at_4", min(1.0, 2 * value), step=step, timestamp=1000 + step)
        for step in range(1, 21):
            client.log_metric(rid, "train/reward_mean", -1 + step / 10, step=step, timestamp=1000 + step)
            client.log_metric(rid, "train/acc", step / 40, step=step, timestamp=1000 + step)
            client.log_metric(rid, "time/update_s", 3.0 - step / 10, step=step, timestamp=1000 + step)
        client.set_terminated(rid)
    # the same name twice (in another experiment) and a run that never logged train/entropy
    for _ in range(2):
        client.set_terminated(client.create_run(other, run_name="twin").info.run_id)
    return {"uri": uri, "ids": ids}


def test_compare_two_runs_by_name_writes_csv_markdown_and_pngs(store: dict[str, Any], tmp_path: Path) -> None:
    result = compare(["grpo", "dapo"], tmp_path, experiment="ablation", tracking_uri=store["uri"])
    # default metrics: the val metrics the runs have, then the train ones that exist (no train/entropy here)
    assert result.metrics == ["val/acc_avg_at_4", "val/pass_at_4", "train/reward_mean", "train/acc"]
    assert result.differing == {"model.algorithm.eps_high": {"grpo": "0.2", "dapo": "0.28"}}

    with (tmp_path / "comparison.csv").open(encoding="utf-8") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert rows["grpo"]["run_id"] == store["ids"]["grpo"] and rows["grpo"]["last_step"] == "20"
    assert rows["grpo"]["param:model.algorithm.eps_high"] == "0.2"
    assert "param:model.optim.lr" not in rows["grpo"]  # equal in both runs
    assert float(rows["grpo"]["val/acc_avg_at_4:final"]) == 0.375
    assert float(rows["grpo"]["val/acc_avg_at_4:best"]) == 0.5
    assert (
        float(rows["dapo"]["val/acc_avg_at_4:final"]) == float(rows["dapo"]["val/acc_avg_at_4:best"]) == 0.625
    )
    assert float(rows["dapo"]["train/reward_mean:final"]) == pytest.approx(1.0)  # -1 + 20/10

    md = (tmp_path / "comparison.md").read_text(encoding="utf-8")
    assert "| grpo | 20 | 0.375 (0.5) | 0.75 (1) | 1 | 0.5 |" in md
    assert "| dapo | 20 | 0.625 | 1 | 1 | 0.5 |" in md
    assert "| model.algorithm.eps_high | 0.2 | 0.28 |" in md and "![all metrics](curves.png)" in md

    for name in (
        "val_acc_avg_at_4.png",
        "val_pass_at_4.png",
        "train_reward_mean.png",
        "train_acc.png",
        "curves.png",
    ):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    fig = plot_metric(result.runs, "val/acc_avg_at_4")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["grpo", "dapo"]  # both runs named


def test_runs_by_id_patterns_and_lower_is_better(store: dict[str, Any], tmp_path: Path) -> None:
    ids = store["ids"]
    result = compare(
        [ids["dapo"], "grpo"], tmp_path, metrics=["val/*", "time/update_s"], tracking_uri=store["uri"]
    )
    assert [r.label for r in result.runs] == ["dapo", "grpo"]
    assert result.metrics == ["val/acc_avg_at_4", "val/pass_at_4", "time/update_s"]
    with (tmp_path / "comparison.csv").open(encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["time/update_s:best"]) == pytest.approx(1.0)  # time: lowest is best (3.0 - 20/10)


def test_clear_errors(store: dict[str, Any], tmp_path: Path) -> None:
    uri = store["uri"]
    with pytest.raises(
        CompareError, match=r"2 runs are named 'twin' in any experiment: [0-9a-f]{32} .*pass a run id"
    ):
        compare(["twin", "grpo"], tmp_path, tracking_uri=uri)
    with pytest.raises(
        CompareError, match=r"no run with id or name 'nope' in experiment 'ablation' at sqlite"
    ):
        compare(["grpo", "nope"], tmp_path, experiment="ablation", tracking_uri=uri)
    with pytest.raises(CompareError, match=r"no experiment named 'missing' \(experiments: .*ablation"):
        compare(["grpo"], tmp_path, experiment="missing", tracking_uri=uri)
    with pytest.raises(
        CompareError, match=r"no run logged a metric 'val/acc_avg_at_32'; logged metrics: time/"
    ):
        compare(["grpo"], tmp_path, metrics=["val/acc_avg_at_32"], tracking_uri=uri)
    with pytest.raises(CompareError, match="the same run was given twice"):
        compare(["grpo", store["ids"]["grpo"]], tmp_path, tracking_uri=uri)


def test_command_line(
    store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "grpo",
                "dapo",
                "--experiment",
                "ablation",
                "--metrics",
                "val/acc_avg_at_4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| grpo | 20 | 0.375 (0.5) |" in printed and f"wrote {out / 'curves.png'}" in printed
    assert main(["compare", "nope", "--out", str(out)]) == 2
    assert "dapo-pl compare: error: no run with id or name 'nope'" in capsys.readouterr().err


def test_select_metrics_orders_k_numerically() -> None:
    available = {"val/acc_avg_at_32", "val/acc_avg_at_4", "val/pass_at_4", "train/entropy", "train/lr"}
    assert select_metrics(available) == [
        "val/acc_avg_at_4", "val/acc_avg_at_32", "val/pass_at_4", "train/entropy",
    ]  # fmt: skip


def test_curve_keeps_the_later_value_of_a_repeated_step_and_best_skips_nan() -> None:
    class M:
        def __init__(self, step: int, value: float, timestamp: int) -> None:
            self.step, self.value, self.timestamp = step, value, timestamp

    points = curve([M(2, 0.5, 10), M(1, 0.1, 5), M(2, 0.7, 20)])  # step 2 logged again after a resume
    assert points == [(1, 0.1), (2, 0.7)]
    assert final_and_best([(1, float("nan")), (2, 0.3)], "val/acc_avg_at_4") == (0.3, 0.3)
    assert final_and_best([], "x") == (None, None)


# ---- the ablation configs -------------------------------------------------------------------------------------
def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys (list items by index) -> JSON values; an empty list or dict is a value of its own."""
    if isinstance(tree, dict | list) and tree:
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out: dict[str, str] = {}
        for key, value in items:
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True)}


def _load(path: Path) -> dict[str, str]:
    return _flat(yaml.safe_load(path.read_text(encoding="utf-8")))


# What each Table 1 row adds to the one before it (as key prefixes); the run name and the checkpoint folder
# (paper scale) change too.
ROW_KNOBS = {
    "2_overlong_filtering": ("model.algorithm.overlong_filtering",),
    "3_clip_higher": ("model.algorithm.eps_high",),
    "4_soft_overlong_punishment": ("data.reward.shaping",),
    "5_token_level_loss": ("model.algorithm.loss_agg",),
    "6_dynamic_sampling": ("data.dynamic_sampling",),
}
BOOKKEEPING = ("trainer.logger.init_args.run_name", "trainer.callbacks.0.init_args.dirpath")


def _check_diff(diff: dict[str, Any], knobs: tuple[str, ...], where: str) -> None:
    allowed = knobs + BOOKKEEPING
    assert all(k.startswith(allowed) for k in diff), (where, sorted(diff))
    assert all(any(k.startswith(knob) for k in diff) for knob in knobs), (where, sorted(diff))


@pytest.mark.parametrize("scale", ["paper", "cpu", "chain"])
def test_each_ablation_row_adds_exactly_one_technique(scale: str) -> None:
    paths = sorted((REPO / "configs" / "ablation" / scale).glob("*.yaml"))
    assert [p.stem for p in paths] == ["1_naive_grpo", *ROW_KNOBS]
    flat = {p.stem: _load(p) for p in paths}
    first = flat["1_naive_grpo"]
    assert (
        json.loads(first["model.algorithm.eps_high"]) == json.loads(first["model.algorithm.eps_low"]) == 0.2
    )
    assert json.loads(first["model.algorithm.loss_agg"]) == "seq-mean-token-mean"
    assert json.loads(first["model.algorithm.overlong_filtering"]) is False
    assert json.loads(first["data.reward.shaping"]) == []
    assert json.loads(first["data.dynamic_sampling.enabled"]) is False
    assert json.loads(first["model.algorithm.kl_coef"]) == 0.0
    assert json.loads(flat["6_dynamic_sampling"]["data.dynamic_sampling.enabled"]) is True
    for prev, row in zip(list(flat)[:-1], list(flat)[1:], strict=True):
        _check_diff(differing_params({prev: flat[prev], row: flat[row]}), ROW_KNOBS[row], f"{prev} -> {row}")


def test_the_last_paper_row_is_the_32b_recipe() -> None:
    recipe = _load(REPO / "configs/recipes/dapo_qwen2.5_32b.yaml")
    row = _load(REPO / "configs/ablation/paper/6_dynamic_sampling.yaml")
    diff = differing_params({"recipe": recipe, "row": row})
    assert set(diff) == {*BOOKKEEPING, "trainer.logger.init_args.experiment_name"}

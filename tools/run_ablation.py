"""Run the DAPO ablation (the paper's Table 1 rows) one row after the other, then compare the runs.

What it does
    1. For each YAML in ``--rows`` (sorted: ``1_naive_grpo.yaml`` ... ``6_dynamic_sampling.yaml``) runs
       ``dapo-pl fit --config ROW [EXTRA...]`` from the repository root, logging to MLflow, with the output in
       ``OUT/logs/ROW.log``. A failed row stops the script (the log's tail is printed).
    2. Runs ``dapo-pl compare`` on the runs just made (by run id, so earlier runs of the same names in the same
       store do not get in the way): ``OUT/compare/comparison.{csv,md}`` and PNG curves.
    3. Writes ``OUT/ablation.md``: what ran, how long each row took, and the comparison table.

How to run
    python tools/run_ablation.py                                  # the CPU miniature (configs/ablation/cpu)
    python tools/run_ablation.py --rows configs/ablation/paper    # the paper-scale rows (a GPU cluster each)
    python tools/run_ablation.py --compare-only                   # compare the newest run of each row again
    python tools/run_ablation.py -- --trainer.max_steps 4         # anything after -- goes to every fit

    Tracking: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///OUT/mlflow.db`` (a store of the
    ablation's own). The CPU rows need the quickstart's model and data (``make quickstart`` builds them).

How long
    The CPU miniature: about 3 minutes for the six rows on 2 idle CPU cores (each row's header gives its time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def row_identity(path: Path) -> tuple[str, str]:
    """(experiment, run name) a row YAML logs to."""
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    init = ((cfg.get("trainer") or {}).get("logger") or {}).get("init_args") or {}
    experiment, run_name = init.get("experiment_name"), init.get("run_name")
    if not experiment or not run_name:
        raise SystemExit(f"{path}: trainer.logger.init_args needs experiment_name and run_name")
    return str(experiment), str(run_name)


def newest_run_id(client: Any, experiment: str, run_name: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp is not None
        else []
    )
    if not runs:
        raise SystemExit(f"no run named {run_name!r} in experiment {experiment!r} at {client.tracking_uri}")
    return str(runs[0].info.run_id)


def fit_row(path: Path, extra: list[str], env: dict[str, str], log_path: Path) -> float:
    cmd = [sys.executable, "-m", "dapo_pl", "fit", "--config", str(path), *extra]
    print(f"[ablation] {path.stem}: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if code != 0:
        tail = log_path.read_text(encoding="utf-8")[-3000:]
        raise SystemExit(
            f"[ablation] {path.stem} failed (exit {code}) after {seconds:.0f} s; {log_path}:\n{tail}"
        )
    print(f"[ablation] {path.stem}: done in {seconds / 60:.1f} min", flush=True)
    return seconds


def write_summary(
    out: Path, rows: list[Path], seconds: dict[str, float], uri: str, table: list[str], extra: list[str]
) -> Path:
    lines = [
        "# Ablation run",
        "",
        f"Rows from `{rows[0].parent.relative_to(REPO) if rows[0].is_relative_to(REPO) else rows[0].parent}` "
        "(`python tools/run_ablation.py`), "
        f"tracked at `{uri}`" + (f", extra arguments `{' '.join(extra)}`" if extra else "") + ".",
        "",
        "| row | config | wall time |",
        "|---|---|---|",
    ]
    for path in rows:
        took = f"{seconds[path.stem] / 60:.1f} min" if path.stem in seconds else "(not re-run)"
        lines.append(f"| {row_identity(path)[1]} | `{path.name}` | {took} |")
    lines += ["", "Produced by `dapo-pl compare` (final value, best in parentheses):", "", *table, ""]
    summary = out / "ablation.md"
    summary.write_text("\n".join(lines), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default="configs/ablation/cpu", help="folder of row YAMLs (run in name order)"
    )
    parser.add_argument(
        "--out", default="artifacts/ablation_cpu", help="logs, comparison and summary go here"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or OUT/mlflow.db)"
    )
    parser.add_argument("--metrics", help="metrics for dapo-pl compare (default: its defaults)")
    parser.add_argument("--compare-only", action="store_true", help="no fits: compare each row's newest run")
    args = parser.parse_args(argv)

    rows = sorted((REPO / args.rows).glob("*.yaml"))  # an absolute --rows stays absolute
    if not rows:
        raise SystemExit(f"no YAML files in {args.rows}")
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    seconds: dict[str, float] = {}
    if not args.compare_only:
        for path in rows:
            seconds[path.stem] = fit_row(path, extra, env, out / "logs" / f"{path.stem}.log")

    import mlflow

    from dapo_pl.cli import main as dapo_pl

    client = mlflow.MlflowClient(uri)
    run_ids = [newest_run_id(client, *row_identity(path)) for path in rows]
    compare_args = ["compare", *run_ids, "--out", str(out / "compare"), "--tracking-uri", uri]
    if args.metrics:
        compare_args += ["--metrics", args.metrics]
    print(f"[ablation] dapo-pl {' '.join(compare_args)}", flush=True)
    if dapo_pl(compare_args) != 0:
        return 1
    summary = write_summary(
        out, rows, seconds, uri, metrics_table_of(out / "compare" / "comparison.md"), extra
    )
    print(f"[ablation] wrote {summary} and {out / 'compare'}/ (comparison.csv, comparison.md, PNG curves)")
    return 0


def metrics_table_of(comparison_md: Path) -> list[str]:
    """The metrics table of a comparison.md (the table under its "## Metrics" heading)."""
    lines = comparison_md.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Metrics"))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
    return table


if __name__ == "__main__":
    sys.exit(main())

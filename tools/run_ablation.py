"""Run the DAPO ablation (the paper's Table 1 rows) over several seeds, then compare the rows with error bars.

What it does
    1. For each YAML in ``--rows`` (sorted: ``1_naive_grpo.yaml`` ... ``6_dynamic_sampling.yaml``) and each seed of
       ``--seeds`` runs ``dapo-pl fit --config ROW --seed_everything SEED --trainer.logger.init_args.run_name
       NAME-sSEED [EXTRA...]`` from the repository root, logging to MLflow, with the output in
       ``OUT/logs/ROW-sSEED.log``. A failed fit stops the script (the log's tail is printed).
    2. Runs ``dapo-pl compare --group-by run_name`` on the runs just made (by run id, so earlier runs of the same
       names in the same store do not get in the way): the seeds of a row are one group, reported as mean, std
       and 95% interval over seeds; ``OUT/compare/comparison.{csv,md}`` and PNG curves with bands.
    3. Writes ``OUT/ablation.md``: what ran, how long each fit took, the load average, and the comparison table.

How to run
    python tools/run_ablation.py                                  # the CPU miniature (configs/ablation/chain)
    python tools/run_ablation.py --seeds 0                        # one seed per row (no error bars)
    python tools/run_ablation.py --rows configs/ablation/cpu      # the first miniature (quickstart task)
    python tools/run_ablation.py --rows configs/ablation/paper    # the paper-scale rows (a GPU cluster each)
    python tools/run_ablation.py --compare-only                   # compare the newest run of each row/seed again
    python tools/run_ablation.py -- --trainer.max_steps 4         # anything after -- goes to every fit

    Tracking: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///OUT/mlflow.db`` (a store of the
    ablation's own). The chain rows need ``python tools/make_chain_task.py --out artifacts/chain``; the cpu rows
    the quickstart's model and data (``make quickstart``).

How long
    The chain miniature, 6 rows x 3 seeds: ~50 s of CPU per fit; 49 min measured on 2 shared cores under a load
    average of 15-33 (about 10 min expected on 2 idle cores with --jobs 2, not measured). docs/evaluation.md.
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
# What the ablation table shows: validation with its intervals' centre, and what each technique acts on.
ABLATION_METRICS = (
    "val/acc_avg_at_4,val/pass_at_1,val/pass_at_4,val/maj_at_4,train/reward_mean,train/response_length_mean,"
    "train/truncated_frac,train/kept_group_frac,train/entropy,train/clipfrac_high,train/clipfrac_low"
)


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


def seeded_name(run_name: str, seed: int) -> str:
    """The run name of one seed of a row, e.g. ``1-naive-grpo-s2`` (``dapo-pl compare --group-by run_name``
    strips the ``-s2`` again)."""
    return f"{run_name}-s{seed}"


def fit_row(path: Path, seed: int, extra: list[str], env: dict[str, str], log_path: Path) -> float:
    run_name = seeded_name(row_identity(path)[1], seed)
    cmd = [sys.executable, "-m", "dapo_pl", "fit", "--config", str(path), "--seed_everything", str(seed),
           "--trainer.logger.init_args.run_name", run_name, *extra]  # fmt: skip
    print(f"[ablation] {run_name}: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if code != 0:
        tail = log_path.read_text(encoding="utf-8")[-3000:]
        raise SystemExit(
            f"[ablation] {run_name} failed (exit {code}) after {seconds:.0f} s; {log_path}:\n{tail}"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"[ablation] {run_name}: done in {seconds / 60:.1f} min (load average {load})", flush=True)
    return seconds


def run_fits(
    rows: list[Path], seeds: list[int], extra: list[str], env: dict[str, str], out: Path, jobs: int
) -> tuple[dict[str, float], list[float]]:
    """Every (row, seed) fit, ``jobs`` at a time; returns each fit's seconds and the load average after it."""
    from concurrent.futures import ThreadPoolExecutor

    if jobs > 1:
        env = {**env, "OMP_NUM_THREADS": str(max(1, 2 // jobs))}
    todo = [(path, seed, f"{path.stem}-s{seed}") for path in rows for seed in seeds]
    seconds: dict[str, float] = {}
    loads: list[float] = []

    def one(item: tuple[Path, int, str]) -> None:
        path, seed, key = item
        seconds[key] = fit_row(path, seed, extra, env, out / "logs" / f"{key}.log")
        loads.append(os.getloadavg()[0])

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, item) for item in todo]
        try:
            for future in futures:
                future.result()  # a failed fit (SystemExit) stops the run here
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the fits already running finish; no new ones
            raise
    return seconds, loads


def write_summary(
    out: Path, rows: list[Path], seeds: list[int], seconds: dict[str, float], uri: str, table: list[str],
    extra: list[str], loads: list[float], wall: float | None = None,
) -> Path:  # fmt: skip
    where = rows[0].parent.relative_to(REPO) if rows[0].is_relative_to(REPO) else rows[0].parent
    total = sum(seconds.values())
    lines = [
        "# Ablation run",
        "",
        f"Rows from `{where}`, seeds {', '.join(map(str, seeds))} (`python tools/run_ablation.py`), "
        f"tracked at `{uri}`" + (f", extra arguments `{' '.join(extra)}`" if extra else "") + ".",
        f"Wall time of the fits: {(total if wall is None else wall) / 60:.1f} min (each fit's time summed: "
        f"{total / 60:.1f} min); load average (1 min) at the end of each fit: "
        + (f"{min(loads):.1f} to {max(loads):.1f}, mean {sum(loads) / len(loads):.1f}." if loads else "n/a."),
        "",
        "| row | config | wall time per seed |",
        "|---|---|---|",
    ]
    for path in rows:
        took = [f"{seconds[f'{path.stem}-s{s}'] / 60:.1f}" for s in seeds if f"{path.stem}-s{s}" in seconds]
        lines.append(
            f"| {row_identity(path)[1]} | `{path.name}` | {' / '.join(took) + ' min' if took else '(not re-run)'} |"
        )
    lines += [
        "",
        "Produced by `dapo-pl compare --group-by run_name` (mean ± 95% CI over seeds):",
        "",
        *table,
        "",
    ]
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
        "--rows", default="configs/ablation/chain", help="folder of row YAMLs (run in name order)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (--seed_everything) per row")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="fits at once; with more than 1, each fit's torch gets 2 / jobs threads (OMP_NUM_THREADS), so the "
        "cores are shared, not oversubscribed (start-up and validation overlap)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="artifacts/ablation_chain", help="logs, comparison and summary go here"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or OUT/mlflow.db)"
    )
    parser.add_argument("--metrics", default=ABLATION_METRICS, help="metrics for dapo-pl compare")
    parser.add_argument("--compare-only", action="store_true", help="no fits: compare each row's newest run")
    args = parser.parse_args(argv)

    rows = sorted((REPO / args.rows).glob("*.yaml"))  # an absolute --rows stays absolute
    if not rows:
        raise SystemExit(f"no YAML files in {args.rows}")
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds:
        raise SystemExit("--seeds needs at least one seed")
    seconds: dict[str, float] = {}
    loads: list[float] = []
    wall: float | None = None
    if not args.compare_only:
        import mlflow

        # Create the store and the experiments once, here: fits that start at once would race to create them.
        client = mlflow.MlflowClient(uri)
        for experiment in {row_identity(path)[0] for path in rows}:
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment)
        start = time.monotonic()
        seconds, loads = run_fits(rows, seeds, extra, env, out, args.jobs)
        wall = time.monotonic() - start

    import mlflow

    from dapo_pl.cli import main as dapo_pl

    client = mlflow.MlflowClient(uri)
    run_ids = []
    for path in rows:
        experiment, run_name = row_identity(path)
        run_ids += [newest_run_id(client, experiment, seeded_name(run_name, seed)) for seed in seeds]
    compare_args = ["compare", *run_ids, "--out", str(out / "compare"), "--tracking-uri", uri]
    compare_args += ["--group-by", "run_name"]
    compare_args += ["--metrics", args.metrics]
    print(f"[ablation] dapo-pl {' '.join(compare_args)}", flush=True)
    if dapo_pl(compare_args) != 0:
        return 1
    table = metrics_table_of(out / "compare" / "comparison.md")
    summary = write_summary(out, rows, seeds, seconds, uri, table, extra, loads, wall)
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

"""``dapo-pl compare``: compare MLflow runs as a table (CSV, Markdown) and PNG plots of metric curves.

    dapo-pl compare RUN_ID_OR_NAME ... [--experiment NAME] [--metrics m1,m2] [--group-by KEY] --out DIR

Each argument is a run id (32 hex digits) or a run name, looked up in ``--experiment`` if given, else in every
experiment; a name that matches no run or several runs is an error that lists what it found. The tracking URI is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``); a remote
``mlflow server`` works the same way.

Written to ``--out``:
- ``comparison.csv``: one row per run: name, id, experiment, last step, every param that differs between the
  runs (``param:<name>``), and ``<metric>:final`` / ``<metric>:best`` for each chosen metric.
- ``comparison.md``: the same as Markdown tables (metrics as "final (best)"), and links to the plots.
- ``<metric>.png`` (``/`` becomes ``_``) per metric and ``curves.png`` with all of them: each run's curve over
  the logged steps, labelled by run name.

With ``--group-by KEY`` (a param, ``tag:NAME``, or ``run_name`` without its seed suffix) runs that differ only
in their seed become groups: mean, std and 95% CI per group, curves with bands (:mod:`dapo_pl.compare_groups`).

Default metrics: every ``val/acc_avg_at_*``, ``val/pass_at_*`` and ``val/maj_at_*`` the runs logged (not their
``_ci_low`` / ``_ci_high`` bounds), then ``train/reward_mean``,
``train/acc``, ``train/entropy``. ``--metrics`` takes names or shell-style patterns (``val/*``).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo_pl.tracking import TrackingUnavailable, check_reachable, is_remote, use_short_http_timeouts

DEFAULT_TRAIN_METRICS = ("train/reward_mean", "train/acc", "train/entropy")
DEFAULT_VAL_PATTERNS = ("val/acc_avg_at_*", "val/pass_at_*", "val/maj_at_*")
_INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")  # bounds of logged intervals: not default metrics of their own
# "best" is the highest value, except for metrics whose name contains one of these (lower is better).
LOWER_IS_BETTER = ("loss", "time/", "grad_norm", "logprob_abs_diff", "truncated_frac", "num_gen_batches")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MD_PARAM_CHARS = 60


class CompareError(Exception):
    """A run that cannot be found or is ambiguous, or a metric no run has: the message says which."""


@dataclass
class RunData:
    """One run as the comparison sees it: label (unique), params and each chosen metric's (step, value) curve."""

    run_id: str
    name: str
    label: str
    experiment: str
    status: str
    params: dict[str, str]
    metric_keys: set[str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def last_step(self) -> int | None:
        steps = [pts[-1][0] for pts in self.curves.values() if pts]
        return max(steps) if steps else None


# ---- resolving runs ------------------------------------------------------------------------------------------
def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(
                f"no experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})"
            )
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def _runs_named(client: Any, name: str, experiment_ids: list[str]) -> list[Any]:
    quote = '"' if "'" in name else "'"
    found = []
    for i in range(0, len(experiment_ids), 100):  # servers cap the experiment ids of one search
        found += client.search_runs(
            experiment_ids[i : i + 100], filter_string=f"attributes.run_name = {quote}{name}{quote}"
        )
    return found


def _get_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def resolve_runs(client: Any, refs: Sequence[str], experiment: str | None = None) -> list[Any]:
    """MLflow runs for ``refs`` (run ids or names), in order; raises :class:`CompareError` with candidates."""
    experiment_ids: list[str] | None = None
    runs = []
    for ref in refs:
        run = _get_run(client, ref) if _RUN_ID.match(ref) else None
        if run is None:
            if experiment_ids is None:
                experiment_ids = _experiment_ids(client, experiment)
            matches = _runs_named(client, ref, experiment_ids)
            where = f"experiment {experiment!r}" if experiment else "any experiment"
            if not matches:
                raise CompareError(
                    f"no run with id or name {ref!r} in {where} at {client.tracking_uri} "
                    "(set MLFLOW_TRACKING_URI or --tracking-uri to the store the runs were logged to)"
                )
            if len(matches) > 1:
                listing = "; ".join(
                    f"{r.info.run_id} (experiment {r.info.experiment_id}, started {_time(r.info.start_time)})"
                    for r in matches
                )
                raise CompareError(
                    f"{len(matches)} runs are named {ref!r} in {where}: {listing}; pass a run id"
                )
            run = matches[0]
        runs.append(run)
    return runs


def _time(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "?"


def _labels(runs: Sequence[Any]) -> list[str]:
    """Run names, made unique (a repeated name gets its id's first 8 characters)."""
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return [
        f"{n} ({r.info.run_id[:8]})" if names.count(n) > 1 else n for n, r in zip(names, runs, strict=True)
    ]


# ---- metrics -------------------------------------------------------------------------------------------------
def _k_order(name: str) -> tuple[str, int, str]:
    """Sort ``val/acc_avg_at_4`` before ``val/acc_avg_at_32`` (numeric K)."""
    match = re.search(r"(\d+)$", name)
    return (name[: match.start()] if match else name, int(match.group(1)) if match else -1, name)


def select_metrics(available: Iterable[str], requested: Sequence[str] | None = None) -> list[str]:
    """The metrics to compare: ``requested`` names/patterns (in order), or the defaults that exist."""
    available = set(available)
    if not requested:
        points = {m for m in available if not m.endswith(_INTERVAL_SUFFIXES)}
        val = [m for p in DEFAULT_VAL_PATTERNS for m in sorted(fnmatch.filter(points, p), key=_k_order)]
        return val + [m for m in DEFAULT_TRAIN_METRICS if m in available]
    chosen: list[str] = []
    for item in requested:
        matches = sorted(fnmatch.filter(available, item), key=_k_order)
        if not matches:
            raise CompareError(
                f"no run logged a metric {item!r}; logged metrics: {', '.join(sorted(available)) or 'none'}"
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


def curve(history: Iterable[Any]) -> list[tuple[int, float]]:
    """``(step, value)`` sorted by step; when a step was logged twice (a resumed run) the later value wins."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, float(m.value))
    return [(step, by_step[step][1]) for step in sorted(by_step)]


def final_and_best(points: Sequence[tuple[int, float]], metric: str) -> tuple[float | None, float | None]:
    """The value at the last step, and the best value (max, or min where lower is better); NaNs are skipped."""
    if not points:
        return None, None
    finite = [v for _, v in points if not math.isnan(v)]
    best = (min(finite) if lower_is_better(metric) else max(finite)) if finite else None
    return points[-1][1], best


def differing_params(params: dict[str, dict[str, str]]) -> dict[str, dict[str, str | None]]:
    """``{param: {label: value or None}}`` for the params whose value is not the same in every run."""
    keys = sorted({k for p in params.values() for k in p})
    out = {}
    for key in keys:
        values = {label: p.get(key) for label, p in params.items()}
        if len(set(values.values())) > 1:
            out[key] = values
    return out


# ---- loading -------------------------------------------------------------------------------------------------
def load_runs(client: Any, runs: Sequence[Any], metrics: Sequence[str]) -> list[RunData]:
    experiments: dict[str, str] = {}
    out = []
    for run, label in zip(runs, _labels(runs), strict=True):
        exp_id = run.info.experiment_id
        if exp_id not in experiments:
            experiments[exp_id] = client.get_experiment(exp_id).name
        data = RunData(
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            label=label,
            experiment=experiments[exp_id],
            status=run.info.status,
            params=dict(run.data.params),
            metric_keys=set(run.data.metrics),
            tags=dict(run.data.tags),
        )
        for metric in metrics:
            if metric in data.metric_keys:
                data.curves[metric] = curve(client.get_metric_history(run.info.run_id, metric))
        out.append(data)
    return out


# ---- writing -------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def metric_filename(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def write_csv(
    path: Path, runs: Sequence[RunData], metrics: Sequence[str], diff: dict[str, dict[str, Any]]
) -> None:
    header = ["run", "run_id", "experiment", "status", "last_step"]
    header += [f"param:{k}" for k in diff]
    header += [f"{m}:{kind}" for m in metrics for kind in ("final", "best")]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in runs:
            row: list[Any] = [r.label, r.run_id, r.experiment, r.status, r.last_step]
            row += [diff[k][r.label] for k in diff]
            for m in metrics:
                final, best = final_and_best(r.curves.get(m, []), m)
                row += ["" if final is None else repr(final), "" if best is None else repr(best)]
            writer.writerow(row)


def _md_cell(value: Any) -> str:
    text = "—" if value is None else str(value)
    if len(text) > _MD_PARAM_CHARS:
        text = text[: _MD_PARAM_CHARS - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def metrics_table(runs: Sequence[RunData], metrics: Sequence[str]) -> list[str]:
    """Markdown rows: one per run, a "final (best)" cell per metric."""
    rows = []
    for r in runs:
        cells = []
        for m in metrics:
            final, best = final_and_best(r.curves.get(m, []), m)
            cells.append(_fmt(final) if final is None or best == final else f"{_fmt(final)} ({_fmt(best)})")
        rows.append([r.label, r.last_step, *cells])
    return _md_table(["run", "last step", *metrics], rows)


def write_markdown(
    path: Path, runs: Sequence[RunData], metrics: Sequence[str], diff: dict[str, dict[str, Any]], uri: str
) -> None:
    lower = ", ".join(f"`{p}`" for p in LOWER_IS_BETTER)
    lines = [
        "# Run comparison",
        "",
        f"Runs from `{uri}`, compared by `dapo-pl compare`.",
        "",
        *_md_table(
            ["run", "run id", "experiment", "status"],
            [[r.label, r.run_id, r.experiment, r.status] for r in runs],
        ),
        "",
        "## Metrics: final value (best value)",
        "",
        "Final: the value at the run's last logged step. Best: the highest value (the lowest for metrics whose "
        f"name contains {lower}), shown in parentheses when it differs from the final one. Last step: the largest step "
        "logged for these metrics.",
        "",
        *metrics_table(runs, metrics),
        "",
        "## Params that differ",
        "",
    ]
    if diff:
        lines += _md_table(["param", *(r.label for r in runs)], [[k, *v.values()] for k, v in diff.items()])
    else:
        lines.append("None: every param has the same value in all runs.")
    lines += ["", "## Curves", "", "![all metrics](curves.png)", ""]
    lines += [f"- [{m}]({metric_filename(m)})" for m in metrics]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def _draw(ax: Any, runs: Sequence[RunData], metric: str, colors: Sequence[Any]) -> None:
    """Each run's curve; marker and line style vary too, so runs with equal curves stay visible."""
    from matplotlib.ticker import MaxNLocator

    for i, (r, color) in enumerate(zip(runs, colors, strict=False)):
        points = r.curves.get(metric, [])
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(
            steps, values, label=r.label, color=color, linewidth=1.6, linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            marker=_MARKERS[i % len(_MARKERS)] if len(points) <= 40 else None, markersize=5, markerfacecolor="none",
        )  # fmt: skip
    ax.set_title(metric, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_metric(runs: Sequence[RunData], metric: str) -> Any:
    """One metric's curves, one line per run labelled with its name; returns the matplotlib figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, runs, metric, _colors(len(runs)))
    ax.set_ylabel(metric)
    ax.legend(title="run", fontsize=9, loc="best")
    return fig


def metric_grid(metrics: Sequence[str], draw: Callable[[Any, str], None]) -> Any:
    """A figure with one axis per metric (``draw(ax, metric)`` fills it) and one legend above the grid, made of
    the labels of every axis (a curve missing from the first metric still gets its entry)."""
    from matplotlib.figure import Figure

    ncols = 1 if len(metrics) == 1 else 2 if len(metrics) <= 4 else 3
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        draw(ax, metric)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes[: len(metrics)]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 3) or 1, fontsize=10)
    return fig


def plot_grid(runs: Sequence[RunData], metrics: Sequence[str]) -> Any:
    """All metrics in a grid with one legend (run names) above it."""
    colors = _colors(len(runs))
    return metric_grid(metrics, lambda ax, metric: _draw(ax, runs, metric, colors))


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` wrote and compared."""

    runs: list[RunData]
    metrics: list[str]
    differing: dict[str, dict[str, str | None]]
    files: list[Path]
    groups: list[Any] = field(default_factory=list)  # compare_groups.Group, with --group-by


def compare(
    refs: Sequence[str],
    out: str | Path,
    *,
    experiment: str | None = None,
    metrics: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    connect_timeout_s: float = 10.0,
    group_by: str | None = None,
) -> Comparison:
    """Resolve ``refs``, read their params and metric histories, write CSV, Markdown and PNGs under ``out``."""
    import mlflow

    if not refs:
        raise CompareError("give at least one run id or name")
    # the environment before mlflow.get_tracking_uri(): in-process callers (tests, tools) may have set a global URI
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if is_remote(uri):  # a dead server: a clear error in seconds, not MLflow's 255 s of retries per call
        use_short_http_timeouts()
        check_reachable(uri, connect_timeout_s, what="compare")
    client = mlflow.MlflowClient(uri)
    runs = resolve_runs(client, refs, experiment)
    if len({r.info.run_id for r in runs}) < len(runs):
        raise CompareError("the same run was given twice")
    chosen = select_metrics({k for r in runs for k in r.data.metrics}, metrics)
    data = load_runs(client, runs, chosen)
    diff = differing_params({r.label: r.params for r in data})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if group_by:
        from dapo_pl.compare_groups import write_grouped

        groups, files = write_grouped(out, data, chosen, group_by, client.tracking_uri)
        return Comparison(data, chosen, diff, files, groups)
    files = [out / "comparison.csv", out / "comparison.md"]
    write_csv(files[0], data, chosen, diff)
    write_markdown(files[1], data, chosen, diff, client.tracking_uri)
    if chosen:
        for metric in chosen:
            files.append(out / metric_filename(metric))
            plot_metric(data, metric).savefig(files[-1])
        files.append(out / "curves.png")
        plot_grid(data, chosen).savefig(files[-1])
    return Comparison(data, chosen, diff, files)


# ---- command line --------------------------------------------------------------------------------------------
def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="compare MLflow runs: CSV and Markdown tables, PNG metric curves",
        description=(
            "Compare MLflow runs (ids or names): params that differ, final and best value of each metric, and "
            "PNG curves. Tracking URI: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_ID_OR_NAME", help="run ids or run names")
    parser.add_argument("--experiment", help="look names up in this experiment only (default: all)")
    parser.add_argument(
        "--metrics",
        help="comma-separated metric names or patterns (default: val/acc_avg_at_*, val/pass_at_*, "
        "train/reward_mean, train/acc, train/entropy)",
    )
    parser.add_argument(
        "--group-by",
        metavar="KEY",
        help="aggregate runs that differ only in their seed: a param name, tag:NAME, or run_name (the run name "
        "without a -sN / -seedN suffix); mean, std and 95%% CI per group, curves with bands",
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or MLflow's)"
    )
    parser.set_defaults(func=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        result = compare(
            args.runs, args.out, experiment=args.experiment, metrics=metrics, tracking_uri=args.tracking_uri,
            group_by=args.group_by,
        )  # fmt: skip
    except (CompareError, TrackingUnavailable) as exc:
        print(f"dapo-pl compare: error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(f"{r.label} ({r.run_id})" for r in result.runs)
    print(f"compared {len(result.runs)} runs: {names}")
    print(f"metrics: {', '.join(result.metrics) or 'none'}; params that differ: {len(result.differing)}")
    print()
    if result.groups:
        from dapo_pl.compare_groups import group_table

        print(f"{len(result.groups)} groups by {args.group_by}: mean ± 95% CI over each group's runs")
        print("\n".join(group_table(result.groups, result.metrics)))
    else:
        print("\n".join(metrics_table(result.runs, result.metrics)))
    print()
    for path in result.files:
        print(f"wrote {path}")
    return 0

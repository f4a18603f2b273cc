"""``dapo-pl compare --group-by KEY``: runs that differ only in their seed become one group with error bars.

``KEY`` is a logged param (``model.algorithm.eps_high``), ``tag:NAME`` (an MLflow tag), or ``run_name``: the run
name without a trailing seed suffix (``-s2``, ``_s2``, ``-seed2``, ``_seed2``), so ``3-clip-higher-s0`` ...
``3-clip-higher-s2`` are one group (``tools/run_ablation.py`` names its runs this way).

Within a group every param except the seeds (``seed_everything``, ``seeds.*``, any ``*.seed``) and the run name
must be equal, else the comparison stops and names the params that differ: a group is "the same run, several
seeds". For each group and metric (the value at each run's last logged step):

- ``mean``, ``std`` (sample standard deviation over the group's runs, ``n - 1`` in the denominator) and a 95%
  confidence interval for the mean, ``mean +- t(0.975, n - 1) * std / sqrt(n)`` (Student's t: with 3 seeds the
  half-width is 2.48 std). One run: no std, no interval.
- Curves: at each logged step the mean over the group's runs with a band of the same 95% interval.

Written to ``--out``: ``comparison.csv`` (one row per group: runs, ``<metric>:mean|std|ci_low|ci_high|n``),
``comparison.md`` (``mean ± CI (n seeds)`` cells, the runs of each group), and PNGs with bands.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo_pl.compare import (
    CompareError,
    RunData,
    _colors,
    _md_table,
    final_and_best,
    metric_filename,
    metric_grid,
)

_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)\d+$")
CONFIDENCE = 0.95


def is_seed_param(name: str) -> bool:
    """Params that may differ inside a group: the seeds and the run name."""
    return (
        name == "seed_everything"
        or name.startswith("seeds.")
        or name.endswith(".seed")
        or name.endswith("run_name")
    )


def group_key(run: RunData, key: str) -> str:
    """The group of ``run`` under ``--group-by key`` (see the module docstring); a missing key is an error."""
    if key == "run_name":
        return _SEED_SUFFIX.sub("", run.name or run.label)
    if key.startswith("tag:"):
        tag = key[len("tag:") :]
        if tag not in run.tags:
            raise CompareError(
                f"run {run.label!r} has no tag {tag!r} (its tags: {', '.join(sorted(run.tags))})"
            )
        return run.tags[tag]
    if key not in run.params:
        near = sorted(p for p in run.params if key.split(".")[-1] in p)[:8]
        raise CompareError(
            f"run {run.label!r} has no param {key!r}" + (f" (similar: {', '.join(near)})" if near else "")
            + "; --group-by takes a param name, tag:NAME or run_name"
        )  # fmt: skip
    return run.params[key]


# Student's t quantile t(0.975, df) for df = 1..30 (6 decimals); beyond, a Cornish-Fisher expansion in 1/df
# (relative error below 1e-6 from df = 31 on). scipy is not a dependency.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """Student's t quantile ``t(0.975, df)`` (the 95% two-sided interval), e.g. 4.303 for df = 2."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and 95% interval of a group's values (std and interval None for a single value)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def summarize(values: Sequence[float]) -> Summary | None:
    """:class:`Summary` of the finite ``values`` (None when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None
    n = len(finite)
    mean = sum(finite) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def cell(s: Summary | None) -> str:
    """A Markdown cell: ``0.412 ± 0.031 (3 seeds)``."""
    if s is None:
        return "n/a"
    if s.low is None:
        return f"{s.mean:.4g} (1 seed)"
    return f"{s.mean:.4g} ± {s.mean - s.low:.2g} ({s.n} seeds)"


@dataclass
class Group:
    """The runs of one group and each metric's summary of their final values."""

    name: str
    runs: list[RunData]
    finals: dict[str, Summary | None]


def make_groups(runs: Sequence[RunData], metrics: Sequence[str], key: str) -> list[Group]:
    """Groups in order of first appearance; raises :class:`CompareError` when a group's runs differ in more than
    their seeds."""
    members: dict[str, list[RunData]] = {}
    for r in runs:
        members.setdefault(group_key(r, key), []).append(r)
    groups = []
    for name, rs in members.items():
        check_only_seeds_differ(name, rs, key)
        finals = {}
        for m in metrics:
            values = [f for r in rs if (f := final_and_best(r.curves.get(m, []), m)[0]) is not None]
            finals[m] = summarize(values)
        groups.append(Group(name, rs, finals))
    return groups


def check_only_seeds_differ(name: str, runs: Sequence[RunData], key: str) -> None:
    keys = {k for r in runs for k in r.params if not is_seed_param(k) and k != key}
    differ = sorted(k for k in keys if len({r.params.get(k) for r in runs}) > 1)
    if differ:
        raise CompareError(
            f"group {name!r} (--group-by {key}) mixes runs that differ in more than their seed: "
            f"{', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''}; group by one of these or compare "
            "them separately"
        )


def band(runs: Sequence[RunData], metric: str) -> list[tuple[int, Summary]]:
    """Per logged step, the summary of the values the group's runs logged at that step."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for step, value in r.curves.get(metric, []):
            by_step.setdefault(step, []).append(value)
    out = []
    for step in sorted(by_step):
        s = summarize(by_step[step])
        if s is not None:
            out.append((step, s))
    return out


# ---- writing -------------------------------------------------------------------------------------------------
def write_group_csv(path: Path, groups: Sequence[Group], metrics: Sequence[str]) -> None:
    header = ["group", "runs", "run_ids"]
    header += [f"{m}:{part}" for m in metrics for part in ("mean", "std", "ci_low", "ci_high", "n")]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for g in groups:
            row: list[Any] = [g.name, " ".join(r.label for r in g.runs), " ".join(r.run_id for r in g.runs)]
            for m in metrics:
                s = g.finals[m]
                parts = (s.mean, s.std, s.low, s.high, s.n) if s else (None,) * 5
                row += ["" if v is None else repr(v) for v in parts]
            writer.writerow(row)


def group_table(groups: Sequence[Group], metrics: Sequence[str]) -> list[str]:
    """Markdown rows: one per group, a ``mean ± CI (n seeds)`` cell per metric."""
    return _md_table(
        ["group", "runs", *metrics],
        [[g.name, len(g.runs), *(cell(g.finals[m]) for m in metrics)] for g in groups],
    )


def write_group_markdown(
    path: Path, groups: Sequence[Group], metrics: Sequence[str], key: str, uri: str
) -> None:
    lines = [
        "# Run comparison, grouped",
        "",
        f"Runs from `{uri}`, grouped by `{key}` by `dapo-pl compare --group-by {key}`.",
        "",
        *_md_table(
            ["group", "runs"],
            [[g.name, ", ".join(f"{r.label} ({r.run_id[:8]})" for r in g.runs)] for g in groups],
        ),
        "",
        "## Metrics: mean ± 95% CI over the group's runs (final values)",
        "",
        "Each run's value at its last logged step; mean over the runs of a group ± the half-width of a 95% "
        "confidence interval for the mean (Student's t with n - 1 degrees of freedom, n the runs with the metric). "
        "Groups whose intervals overlap are not shown to differ.",
        "",
        *group_table(groups, metrics),
        "",
        "## Curves",
        "",
        "Mean over each group's runs at every logged step, with its 95% interval as a band.",
        "",
        "![all metrics](curves.png)",
        "",
        *[f"- [{m}]({metric_filename(m)})" for m in metrics],
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _draw_bands(ax: Any, groups: Sequence[Group], metric: str, colors: Sequence[Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    for g, color in zip(groups, colors, strict=False):
        points = band(g.runs, metric)
        if not points:
            continue
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1].mean for p in points], color=color, linewidth=1.6, label=f"{g.name} (n={len(g.runs)})",
                marker="o" if len(points) <= 40 else None, markersize=4)  # fmt: skip
        lows = [p[1].low if p[1].low is not None else p[1].mean for p in points]
        highs = [p[1].high if p[1].high is not None else p[1].mean for p in points]
        ax.fill_between(steps, lows, highs, color=color, alpha=0.2, linewidth=0)
        means = [p[1].mean for p in points]  # error bars too: a band over a single logged step has no width
        yerr = [
            [m - lo for m, lo in zip(means, lows, strict=True)],
            [hi - m for m, hi in zip(means, highs, strict=True)],
        ]
        ax.errorbar(steps, means, yerr=yerr, fmt="none", ecolor=color, capsize=3, linewidth=1)
    ax.set_title(metric, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_group_metric(groups: Sequence[Group], metric: str) -> Any:
    """One metric: each group's mean curve and 95% band; returns the matplotlib figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    _draw_bands(ax, groups, metric, _colors(len(groups)))
    ax.set_ylabel(metric)
    ax.legend(title="group", fontsize=9, loc="best")
    return fig


def plot_group_grid(groups: Sequence[Group], metrics: Sequence[str]) -> Any:
    """All metrics in a grid, each group's mean curve and band, one legend (group names) above it."""
    colors = _colors(len(groups))
    return metric_grid(metrics, lambda ax, metric: _draw_bands(ax, groups, metric, colors))


def write_grouped(
    out: Path, runs: Sequence[RunData], metrics: Sequence[str], key: str, uri: str
) -> tuple[list[Group], list[Path]]:
    """Group ``runs`` by ``key`` and write CSV, Markdown and PNGs with bands under ``out``."""
    groups = make_groups(runs, metrics, key)
    files = [out / "comparison.csv", out / "comparison.md"]
    write_group_csv(files[0], groups, metrics)
    write_group_markdown(files[1], groups, metrics, key, uri)
    if metrics:
        for metric in metrics:
            files.append(out / metric_filename(metric))
            plot_group_metric(groups, metric).savefig(files[-1])
        files.append(out / "curves.png")
        plot_group_grid(groups, metrics).savefig(files[-1])
    return groups, files

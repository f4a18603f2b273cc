"""Benchmark: the ``math_equivalence`` verifier against math-verify 0.9, on the same labelled cases, in one run.

What: both verifiers grade every case of ``tests/verifiers/data/math_cases.jsonl`` (or ``--cases``) in a warm
process (imports done, worker pool started, one warm-up pass over a few *other* cases, caches cleared); we
print cases/s for each, the throughput ratio, agreement of each with the human labels, and how many
reward-hacking attempts (category ``hack``) each accepts.

How to run (from the repo root)::

    .venv/bin/python tools/bench_verify.py [--cases FILE] [--batch 256] [--workers 2] [--repeat 1]

Expected time: about 10-20 s on 2 CPU cores (math-verify takes most of it).

How each is called: ours as in training, batches of ``--batch`` samples through ``build_verifier``; math-verify
as its README shows, ``verify(parse("$" + reference + "$"), parse(response))``, one case at a time (it cannot
run in threads or batches: its time limit is ``signal.alarm``). Timings include parsing the references.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ROOT / "tests" / "verifiers" / "data" / "math_cases.jsonl"
WARM_UP = [
    ("so $\\boxed{12}$", "12"),
    ("Answer: $\\frac{3}{7}$", "\\frac37"),
    ("$\\boxed{\\sqrt{18}}$", "3\\sqrt{2}"),
    ("$\\boxed{(1, 5]}$", "1 < x \\le 5"),
    ("$\\boxed{y^2 - 4}$", "(y-2)(y+2)"),
    ("$\\boxed{\\{4, 5\\}}$", "\\{5,4\\}"),
    ("$\\boxed{2-3i}$", "2 - 3i"),
    ("$\\boxed{45^\\circ}$", "45"),
]


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ours(cases: list[dict[str, Any]], batch: int, workers: int | None) -> tuple[list[bool], float]:
    from dapo_pl_verifiers.math import grade

    from dapo_pl.verification import Sample, build_verifier

    verifier = build_verifier("math_equivalence", {"num_workers": workers})
    inner = verifier.fn  # type: ignore[attr-defined]
    inner.warm_up()
    verifier([Sample(r, g) for r, g in WARM_UP])
    grade.reference.cache_clear()
    grade.candidate.cache_clear()
    inner._cache.clear()
    samples = [Sample(c["response"], c["reference"]) for c in cases]
    start = time.perf_counter()
    verdicts = []
    for i in range(0, len(samples), batch):
        verdicts.extend(verifier(samples[i : i + batch]))
    elapsed = time.perf_counter() - start
    inner.close()
    return [bool(v.correct) for v in verdicts], elapsed


def run_math_verify(cases: list[dict[str, Any]]) -> tuple[list[bool], float]:
    from math_verify import parse, verify
    from math_verify import parser as mv_parser

    def grade_one(response: str, reference: str) -> bool:
        try:
            return bool(verify(parse(f"${reference}$"), parse(response)))
        except Exception:  # noqa: BLE001 - math-verify raises on some inputs; that is a wrong answer
            return False

    for r, g in WARM_UP:
        grade_one(r, g)
    for name in dir(mv_parser):
        clear: Callable[[], None] | None = getattr(getattr(mv_parser, name), "cache_clear", None)
        if clear is not None:
            clear()
    start = time.perf_counter()
    results = [grade_one(c["response"], c["reference"]) for c in cases]
    return results, time.perf_counter() - start


def report(name: str, cases: list[dict[str, Any]], results: list[bool], elapsed: float) -> dict[str, float]:
    agree = sum(r == c["expected"] for r, c in zip(results, cases, strict=True))
    hacks = [r for r, c in zip(results, cases, strict=True) if c["category"] == "hack"]
    accepted = sum(hacks)
    rate = len(cases) / elapsed
    print(
        f"{name:17s} {rate:9.1f} cases/s  ({elapsed:6.2f} s)   agreement {agree}/{len(cases)} "
        f"= {100 * agree / len(cases):5.1f}%   hacks accepted {accepted}/{len(hacks)}"
    )
    return {"rate": rate, "agree": agree / len(cases), "hacks": accepted}


def by_category(cases: list[dict[str, Any]], ours: list[bool], theirs: list[bool]) -> None:
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for c, a, b in zip(cases, ours, theirs, strict=True):
        row = table[c["category"]]
        row[0] += 1
        row[1] += a == c["expected"]
        row[2] += b == c["expected"]
    print(f"\n{'category':22s} {'cases':>5s} {'ours':>6s} {'math-verify':>12s}")
    for cat, (n, a, b) in sorted(table.items()):
        print(f"{cat:22s} {n:5d} {a:6d} {b:12d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--batch", type=int, default=256, help="samples per verifier call (training batches)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default min(2, CPUs))")
    ap.add_argument("--categories", action="store_true", help="also print agreement per category")
    args = ap.parse_args()
    cases = load(args.cases)
    print(f"{len(cases)} cases from {args.cases}")
    ours, t_ours = run_ours(cases, args.batch, args.workers)
    theirs, t_theirs = run_math_verify(cases)
    a = report("math_equivalence", cases, ours, t_ours)
    b = report("math-verify 0.9", cases, theirs, t_theirs)
    print(f"throughput ratio (ours / math-verify): {a['rate'] / b['rate']:.1f}x")
    if args.categories:
        by_category(cases, ours, theirs)


if __name__ == "__main__":
    main()

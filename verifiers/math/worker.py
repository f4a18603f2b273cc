"""Imported by worker processes only (the forkserver preloads it): sympy, the fallback parser, a warm-up.

Importing this module runs one small comparison so that sympy's lazy imports and caches are filled once in the
forkserver, and every forked worker starts warm. The parent process never imports it.
"""

from __future__ import annotations

import latex2sympy2_extended  # noqa: F401  (preloaded for the fallback parser)
import sympy  # noqa: F401

from .grade import Task, judge, reference


def warm_up() -> None:
    judge(Task(reference(r"\frac{\sqrt{2}}{2}").answer, reference(r"x^2 + 1").answer))
    judge(Task(reference(r"x^2+2x+1").answer, reference(r"(x+1)^2").answer))


warm_up()

"""The symbolic stage, run only inside worker processes: AST -> sympy, then equality by algebra and numbers.

Conversion builds sympy objects from our AST through sympy's constructors (never from strings), checking
sizes first (``TooLarge``). Text our grammar could not read goes through latex2sympy2_extended, whose ANTLR
parser does not evaluate code; its output is size-checked the same way.

Equality: ``a - b`` is simplified by sympy's automatic canonicalisation; if that is not 0, constants are
compared numerically at 60 significant digits with a *relative* tolerance (so tiny values never collapse to
equal), and expressions with variables at several random points.
"""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from typing import Any

import sympy

from . import exact
from .compare import ExactEq, Tri
from .nodes import Add, Const, Div, Func, Mixed, Mul, Neg, Node, Num, Opaque, PlusMinus, Pow, Raw, Root, Sym

_PREC = 60
_REL_TOL = sympy.Float("1e-40", _PREC)
_POINT_TOL = sympy.Float("1e-20", 30)
_MAX_LOG2 = exact.MAX_BITS
_FUNCS: dict[str, Any] = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh,
    "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp, "abs": sympy.Abs, "floor": sympy.floor,
    "ceiling": sympy.ceiling, "max": sympy.Max, "min": sympy.Min, "arg": sympy.arg,
}  # fmt: skip
_LOOSE_NUMBERS = re.compile(r"\d\s+[\d.]|\d\s*,\s*\d")
_CONSTS = {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "oo": sympy.oo}


class Unsupported(ValueError):
    """The expression uses something the symbolic stage does not evaluate."""


def _log2_magnitude(x: sympy.Basic) -> float:
    """An upper bound on log2 |x| for a number (0 for anything else)."""
    if isinstance(x, sympy.Rational):
        return float(max(abs(x.p).bit_length(), x.q.bit_length()))
    return 0.0


def _pow(base: sympy.Basic, e: sympy.Basic) -> sympy.Basic:
    if isinstance(e, sympy.Rational) and base.is_number:
        size = _log2_magnitude(base) if isinstance(base, sympy.Rational) else 64.0
        if abs(e.p) * max(size, 1.0) > _MAX_LOG2:
            raise exact.TooLarge("a power too large to evaluate")
    elif base.is_number and e.is_number and isinstance(base, sympy.Rational):
        approx = abs(complex(sympy.N(e, 15)))
        if approx * max(_log2_magnitude(base), 1.0) > _MAX_LOG2:
            raise exact.TooLarge("a power too large to evaluate")
    return sympy.Pow(base, e)


def _root(x: sympy.Basic, n: sympy.Basic) -> sympy.Basic:
    if isinstance(n, sympy.Integer) and n % 2 == 1 and x.is_number and x.is_negative:
        return -_pow(-x, sympy.Rational(1, int(n)))  # the real cube root of -8 is -2
    return _pow(x, 1 / n)


def _func(name: str, args: list[sympy.Basic]) -> sympy.Basic:
    if name == "log":
        return sympy.log(*args)
    if name == "factorial":
        n = args[0]
        if n.is_number and (not n.is_real or abs(n) > exact.MAX_FACTORIAL):
            raise exact.TooLarge("a factorial too large to evaluate")
        return sympy.factorial(n)
    if name == "binom":
        return sympy.binomial(*args)
    if name in ("gcd", "lcm"):
        return (sympy.gcd if name == "gcd" else sympy.lcm)(*args)
    if name in _FUNCS:
        return _FUNCS[name](*args)
    raise Unsupported(f"function {name}")


def _leaf(node: Node) -> sympy.Basic | None:
    if isinstance(node, Num):
        return sympy.Rational(node.value.numerator, node.value.denominator)
    if isinstance(node, Sym):
        return sympy.Symbol(node.name)
    if isinstance(node, Const):
        return _CONSTS[node.name]
    if isinstance(node, Mixed):
        v = exact.value(node)
        assert v is not None
        return sympy.Rational(v.numerator, v.denominator)
    if isinstance(node, Raw):
        return from_latex(node.text)
    if isinstance(node, (Opaque, PlusMinus)):
        raise Unsupported(type(node).__name__)
    return None


def to_sympy(node: Node) -> sympy.Basic:
    """The sympy form of ``node``, built through constructors only; raises TooLarge / Unsupported."""
    leaf = _leaf(node)
    if leaf is not None:
        return leaf
    args = [to_sympy(c) for c in exact.children(node)]
    if isinstance(node, Add):
        return sympy.Add(*args)
    if isinstance(node, Mul):
        return sympy.Mul(*args)
    if isinstance(node, Neg):
        return -args[0]
    if isinstance(node, Div):
        return args[0] * _pow(args[1], sympy.Integer(-1))
    if isinstance(node, Pow):
        return _pow(args[0], args[1])
    if isinstance(node, Root):
        return _root(args[0], args[1])
    if isinstance(node, Func):
        return _func(node.name, args)
    raise Unsupported(type(node).__name__)


def _check_tree(expr: Any) -> None:
    """Reject latex2sympy output that would explode when evaluated (power towers, huge factorials)."""
    stack = [expr]
    seen = 0
    while stack:
        cur = stack.pop()
        seen += 1
        if seen > 5_000:
            raise exact.TooLarge("expression tree too large")
        if isinstance(cur, sympy.Pow) and cur.base.is_number and cur.exp.is_number:
            if not (isinstance(cur.exp, sympy.Rational) and abs(cur.exp.p) < 10_000):
                raise exact.TooLarge("a power too large to evaluate")
        if isinstance(cur, sympy.factorial) and cur.args[0].is_number:
            raise exact.TooLarge("a factorial in unparsed text")
        stack.extend(getattr(cur, "args", ()))


def from_latex(text: str) -> sympy.Basic:
    """Fallback: latex2sympy2_extended's ANTLR parser (no eval), size-checked."""
    from latex2sympy2_extended import latex2sympy  # imported in workers only

    if _LOOSE_NUMBERS.search(text):
        raise Unsupported("numbers side by side")  # latex2sympy would read "3 4" as 34
    try:
        expr = latex2sympy(text)
    except Exception as exc:  # the ANTLR front end raises bare Exceptions
        raise Unsupported(f"unparseable: {str(exc).splitlines()[0][:80]}") from exc
    if not isinstance(expr, sympy.Expr):
        raise Unsupported(f"not a single value: {type(expr).__name__}")
    _check_tree(expr)
    return expr


def _num(expr: sympy.Basic, prec: int = _PREC) -> sympy.Basic:
    return sympy.N(expr, prec)


def _close(
    a: sympy.Basic, b: sympy.Basic, tol: sympy.Float, prec: int, point: dict[sympy.Symbol, Any] | None = None
) -> bool | None:
    """Numerical equality (at ``point``) with a relative tolerance; None when not finite numbers."""
    va, vb = sympy.N(a, prec, subs=point), sympy.N(b, prec, subs=point)
    if not (va.is_number and vb.is_number) or va.has(sympy.nan, sympy.zoo) or vb.has(sympy.nan, sympy.zoo):
        return None
    if va.has(sympy.oo, -sympy.oo) or vb.has(sympy.oo, -sympy.oo):
        return bool(va == vb)
    diff = sympy.Abs(_num(va - vb, prec))
    scale = sympy.Max(sympy.Abs(va), sympy.Abs(vb))
    if scale == 0:
        return bool(diff == 0)
    return bool(diff <= tol * scale)


def _points(symbols: list[sympy.Symbol], count: int = 6) -> list[dict[sympy.Symbol, sympy.Rational]]:
    rng = random.Random(20240531)
    pts = []
    for k in range(count):
        sign = -1 if k >= count // 2 and k % 2 else 1
        pts.append({s: sign * sympy.Rational(rng.randint(11, 97), rng.randint(7, 31)) for s in symbols})
    return pts


class SympyEq(ExactEq):
    """:class:`ExactEq` first, then sympy: canonical difference, numbers at 60 digits, random points."""

    def eq(self, a: Node, b: Node) -> Tri:
        fast = super().eq(a, b)
        if fast is not None:
            return fast
        sa, sb = to_sympy(a), to_sympy(b)
        if sa == sb or sa - sb == 0:
            return True
        symbols = sorted(sa.free_symbols | sb.free_symbols, key=lambda s: s.name)
        if not symbols:
            return bool(_close(sa, sb, _REL_TOL, _PREC))
        return self._at_points(sa, sb, symbols)

    def _at_points(self, sa: sympy.Basic, sb: sympy.Basic, symbols: list[sympy.Symbol]) -> bool:
        valid = 0
        for point in _points(symbols):
            same = _close(sa, sb, _POINT_TOL, 30, point)
            if same is False:
                return False
            valid += same is True
        return valid >= 3

    def near(self, cand: Node, ref: Fraction, places: int) -> Tri:
        fast = super().near(cand, ref, places)
        if fast is not None:
            return fast
        v = _num(to_sympy(cand), 30)
        if not v.is_real:
            return False
        return bool(abs(v - sympy.Rational(ref.numerator, ref.denominator)) * 2 * 10**places <= 1)

    def proportional(self, f: Node, g: Node) -> Tri:
        """Whether two equations ``f = 0`` and ``g = 0`` are the same up to a non-zero constant factor."""
        if f == g:
            return True
        sf, sg = to_sympy(f), to_sympy(g)
        symbols = sorted(sf.free_symbols | sg.free_symbols, key=lambda s: s.name)
        if not symbols:
            return False
        ratios = []
        for point in _points(symbols):
            vf, vg = sympy.N(sf, 30, subs=point), sympy.N(sg, 30, subs=point)
            if not (vf.is_number and vg.is_number) or vg == 0 or vf.has(sympy.zoo, sympy.nan):
                continue
            ratios.append(vf / vg)
        if len(ratios) < 3 or any(math.isclose(0.0, abs(complex(r)), abs_tol=1e-30) for r in ratios):
            return False
        return all(abs(complex(r - ratios[0])) <= 1e-15 * abs(complex(ratios[0])) for r in ratios)

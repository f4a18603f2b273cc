"""Exact arithmetic on the AST with Python fractions: the fast path that decides most RL answers.

Integers, decimals, fractions, integer powers and exact roots evaluate exactly, with no rounding anywhere,
so ``1/2^{99}`` never equals ``1/2^{98}`` and huge integers compare digit for digit. Sizes are checked
*before* computing (:data:`MAX_BITS`): ``9^{9^{9^9}}`` raises :class:`TooLarge` instead of running for ever.
Anything irrational, complex or symbolic returns None and is left to the symbolic stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

from .nodes import Add, Const, Div, Func, Mixed, Mul, Neg, Node, Num, Opaque, PlusMinus, Pow, Raw, Root, Sym

MAX_BITS = 200_000  # about 60,000 decimal digits
MAX_FACTORIAL = 3_000


class TooLarge(ArithmeticError):
    """The exact value would be too large to compute safely."""


def children(node: Node) -> Iterator[Node]:
    """The direct sub-expressions of ``node``."""
    if isinstance(node, Add):
        yield from node.terms
    elif isinstance(node, Mul):
        yield from node.factors
    elif isinstance(node, Div):
        yield node.num
        yield node.den
    elif isinstance(node, Neg):
        yield node.x
    elif isinstance(node, Pow):
        yield node.base
        yield node.exp
    elif isinstance(node, Root):
        yield node.x
        yield node.n
    elif isinstance(node, Func):
        yield from node.args
    elif isinstance(node, Mixed):
        yield node.whole
        yield node.frac
    elif isinstance(node, PlusMinus):
        if node.a is not None:
            yield node.a
        yield node.b


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents first (iterative, so deep trees cannot overflow the stack)."""
    stack = [node]
    while stack:
        cur = stack.pop()
        yield cur
        stack.extend(children(cur))


def operators(node: Node) -> set[str]:
    """Names of the functions and unevaluated operators used (``sin``, ``log``, ``factorial``, ``sum``...)."""
    found = set()
    for n in walk(node):
        if isinstance(n, Func) and n.name not in ("abs",):
            found.add(n.name)
        elif isinstance(n, Opaque):
            found.add(n.kind)
    return found


def free_symbols(node: Node) -> set[str]:
    return {n.name for n in walk(node) if isinstance(n, Sym)}


def has_const(node: Node, name: str) -> bool:
    return any(isinstance(n, Const) and n.name == name for n in walk(node))


def _bits(q: Fraction) -> int:
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _check(q: Fraction) -> Fraction:
    if _bits(q) > MAX_BITS:
        raise TooLarge(f"a value with more than {MAX_BITS} bits")
    return q


def _int_root(n: int, k: int) -> int | None:
    """The exact k-th root of n >= 0, or None."""
    if k == 2:
        r = math.isqrt(n)
    elif n.bit_length() < 1000:
        r = round(n ** (1.0 / k))
    else:
        return None
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand**k == n:
            return cand
    return None


def _power(base: Fraction, exp: Fraction) -> Fraction | None:
    if exp.denominator != 1:
        return _root(base, exp.denominator) if exp.numerator == 1 else _power_of_root(base, exp)
    e = exp.numerator
    if base == 0:
        return None if e < 0 else Fraction(1 if e == 0 else 0)
    if abs(base) == 1:
        return base ** (e % 2) if base < 0 else Fraction(1)
    if abs(e) * _bits(base) > MAX_BITS:
        raise TooLarge(f"a power with more than {MAX_BITS} bits")
    return base**e


def _power_of_root(base: Fraction, exp: Fraction) -> Fraction | None:
    root = _root(base, exp.denominator)
    return None if root is None else _power(root, Fraction(exp.numerator))


def _root(x: Fraction, k: int) -> Fraction | None:
    if k > 64 or k < 1:
        return None
    if x < 0:
        if k % 2 == 0:
            return None
        r = _root(-x, k)
        return None if r is None else -r
    num, den = _int_root(x.numerator, k), _int_root(x.denominator, k)
    return None if num is None or den is None else Fraction(num, den)


def _func(name: str, args: list[Fraction]) -> Fraction | None:
    if name == "abs":
        return abs(args[0])
    if name == "floor":
        return Fraction(math.floor(args[0]))
    if name == "ceiling":
        return Fraction(math.ceil(args[0]))
    if name == "factorial" and args[0].denominator == 1 and 0 <= args[0] <= MAX_FACTORIAL:
        return Fraction(math.factorial(int(args[0])))
    if name == "factorial" and args[0].denominator == 1 and args[0] > MAX_FACTORIAL:
        raise TooLarge(f"a factorial of more than {MAX_FACTORIAL}")
    if name == "binom" and all(a.denominator == 1 for a in args) and 0 <= args[0] <= 100_000:
        return Fraction(math.comb(int(args[0]), int(args[1]))) if args[1] >= 0 else Fraction(0)
    if name in ("max", "min") and args:
        return max(args) if name == "max" else min(args)
    if name in ("gcd", "lcm") and all(a.denominator == 1 for a in args):
        ints = [int(a) for a in args]
        return Fraction(math.gcd(*ints) if name == "gcd" else math.lcm(*ints))
    return None


def value(node: Node) -> Fraction | None:
    """The exact rational value of ``node``, None when it is not (known to be) rational; may raise TooLarge."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, (Sym, Const, Opaque, PlusMinus, Raw)):
        return None
    if isinstance(node, Mixed):
        return node.whole.value + node.frac.num.value / node.frac.den.value  # type: ignore[union-attr]
    parts = []
    for child in children(node):
        v = value(child)
        if v is None:
            return None
        parts.append(v)
    return _combine(node, parts)


def _combine(node: Node, parts: list[Fraction]) -> Fraction | None:
    if isinstance(node, Neg):
        return -parts[0]
    if isinstance(node, Add):
        return _check(sum(parts, Fraction(0)))
    if isinstance(node, Mul):
        out = Fraction(1)
        for p in parts:
            out = _check(out * p)
        return out
    if isinstance(node, Div):
        return None if parts[1] == 0 else _check(parts[0] / parts[1])
    if isinstance(node, Pow):
        return _power(parts[0], parts[1])
    if isinstance(node, Root):
        return _root(parts[0], int(parts[1])) if parts[1].denominator == 1 else None
    if isinstance(node, Func):
        return _func(node.name, parts)
    return None


def _is_int_literal(node: Node) -> bool:
    if isinstance(node, Neg):
        return _is_int_literal(node.x)
    return isinstance(node, Num) and not node.decimal and node.value.denominator == 1


def _is_power_literal(node: Node) -> bool:
    """``2^{10}``, ``(-3)^{2}``, ``2^{2^{2}}``: integer literals raised to integer literals."""
    return (
        isinstance(node, Pow)
        and _is_int_literal(node.base)
        and (_is_int_literal(node.exp) or _is_power_literal(node.exp))
    )


def is_simple(node: Node) -> bool:
    """Whether ``node`` is a number written in evaluated form: ``-3``, ``0.25``, ``\\frac{3}{4}``, ``2\\frac12``,
    ``3 \\times 10^{5}``, ``2^{10}``. ``3+4``, ``\\sqrt{16}``, ``10!`` or ``\\log_2 8`` are not.

    >>> from .parser import parse_value
    >>> [is_simple(parse_value(s)) for s in ["-3", "\\\\frac{3}{4}", "2^{10}", "3+4", "\\\\sqrt{16}"]]
    [True, True, True, False, False]
    """
    if isinstance(node, (Num, Mixed)):
        return True
    if isinstance(node, Neg):
        return is_simple(node.x)
    if isinstance(node, Div):
        return is_simple(node.num) and is_simple(node.den)
    if _is_power_literal(node):
        return True
    if isinstance(node, Mul) and len(node.factors) == 2:
        mantissa, power = node.factors
        return (
            isinstance(mantissa, Num)
            and isinstance(power, Pow)
            and power.base == Num(Fraction(10))
            and _is_int_literal(power.exp)
        )
    return False

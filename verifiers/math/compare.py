"""Structural comparison of a candidate answer with the reference: the grading policy, in one place.

Results are three-valued: True, False, or None ("cannot tell without algebra"). The same :class:`Comparer`
runs in the parent with :class:`ExactEq` (fractions only; None goes to a worker) and in the workers with the
sympy-backed ``symbolic.SympyEq``.

Policy (what a careful human grader accepts):
- tuples keep order, sets and bare lists do not; ``(2, 5]`` equals ``2 < x \\le 5``; ``x = 5`` equals ``5``;
  ``x = 1, y = 2`` equals ``(1, 2)``; a one-row or one-column matrix equals the tuple of its entries;
- ``\\pm`` stands for both values, so ``\\pm 3`` is not ``3``;
- a reference written as a plain number needs a number in evaluated form (``7``, not ``3+4``, ``\\sqrt{49}``;
  from a million up, closed forms such as ``2^{64}-1`` are fine);
  functions and operators the reference does not use (``\\sin``, ``\\log``, ``!``, ``\\sum``, ``\\int``...)
  are the problem's own expression left unevaluated, and rejected;
- ``50\\%`` equals ``50`` and ``0.5``; ``30^\\circ`` equals ``30`` and ``\\pi/6``;
- an exact answer equals a decimal reference it rounds to (``\\pi`` vs ``3.14``), but a decimal never equals an
  exact reference it only approximates (``0.33`` vs ``1/3``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Protocol

from . import exact
from .nodes import (
    Add,
    Answer,
    BaseNum,
    Const,
    Div,
    Equation,
    Func,
    Interval,
    Matrix,
    Mul,
    Neg,
    Node,
    Num,
    Opaque,
    PlusMinus,
    Pow,
    Relation,
    Scalar,
    Seq,
    Sym,
    Text,
    Union,
)

Tri = bool | None
MAX_ITEMS = 32
LARGE = 10**6  # a number this large may be written in closed form (2^{64}-1) instead of all its digits
_OO = Const("oo")
_PI_OVER_180 = Div(Const("pi"), Num(Fraction(180)))


def tri_all(results: Iterable[Tri]) -> Tri:
    """True if all are True, False if any is False, else None (short-circuits on False)."""
    unknown = False
    for r in results:
        if r is False:
            return False
        unknown |= r is None
    return None if unknown else True


def tri_any(results: Iterable[Tri]) -> Tri:
    """True if any is True, False if all are False, else None (short-circuits on True)."""
    unknown = False
    for r in results:
        if r is True:
            return True
        unknown |= r is None
    return None if unknown else False


class NodeEq(Protocol):
    """Value-level questions the policy asks; answered exactly in the parent and with sympy in workers."""

    def eq(self, a: Node, b: Node) -> Tri: ...

    def near(self, cand: Node, ref: Fraction, places: int) -> Tri: ...

    def proportional(self, f: Node, g: Node) -> Tri: ...


def _inf_sign(node: Node) -> int:
    if node == _OO:
        return 1
    if node == Neg(_OO):
        return -1
    return 0


class ExactEq:
    """Exact rational answers only; None whenever algebra would be needed."""

    def eq(self, a: Node, b: Node) -> Tri:
        if a == b:
            return True
        ia, ib = _inf_sign(a), _inf_sign(b)
        if ia or ib:
            return ia == ib if (ia and ib) or exact.value(b if ia else a) is not None else None
        if exact.free_symbols(a) != exact.free_symbols(b):
            return False
        va, vb = exact.value(a), exact.value(b)
        if va is not None and vb is not None:
            return va == vb
        return None

    def near(self, cand: Node, ref: Fraction, places: int) -> Tri:
        v = exact.value(cand)
        if v is None:
            return None
        return abs(v - ref) * 2 * 10**places <= 1

    def proportional(self, f: Node, g: Node) -> Tri:
        return True if f == g else None


# ---------------------------------------------------------------- canonical forms


def _map_first_pm(node: Node, sign: int) -> tuple[Node, bool]:
    """``node`` with its first ``\\pm`` resolved to ``sign``; the flag says whether one was found."""
    if isinstance(node, PlusMinus):
        b = node.b if sign * node.sign > 0 else Neg(node.b)
        return (b if node.a is None else Add((node.a, b))), True
    fields = {"Add": "terms", "Mul": "factors"}.get(type(node).__name__)
    if fields:
        items = list(getattr(node, fields))
        for k, item in enumerate(items):
            new, found = _map_first_pm(item, sign)
            if found:
                items[k] = new
                return replace(node, **{fields: tuple(items)}), True  # type: ignore[arg-type]
        return node, False
    for attr in ("x", "num", "den", "base", "exp"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, str)):
            new, found = _map_first_pm(child, sign)
            if found:
                return replace(node, **{attr: new}), True  # type: ignore[arg-type]
    return node, False


def expand_pm(node: Node, limit: int = 8) -> list[Node]:
    """Every value of an expression with ``\\pm``: ``1 \\pm \\sqrt{2}`` -> ``[1+\\sqrt2, 1-\\sqrt2]``."""
    out: list[Node] = []
    todo = [node]
    while todo and len(out) + len(todo) <= limit:
        cur = todo.pop(0)
        plus, found = _map_first_pm(cur, 1)
        if not found:
            out.append(cur)
            continue
        todo.extend([plus, _map_first_pm(cur, -1)[0]])
    return out + todo


def _var_free(node: Node) -> bool:
    return not exact.free_symbols(node)


def relation_to_set(rel: Relation) -> Answer:
    """``2 < x \\le 5`` -> ``(2, 5]``; ``x \\ne 3`` -> a union; other relations stay as they are."""
    nodes, ops = rel.nodes, rel.ops
    if (
        len(nodes) == 2
        and isinstance(nodes[0], Func)
        and nodes[0].name == "abs"
        and isinstance(nodes[0].args[0], Sym)
    ):
        bound, op = nodes[1], ops[0]
        if op in ("<", "<=") and _var_free(bound):  # |x| < b  ->  -b < x < b
            return Interval(Neg(bound), bound, op == "<=", op == "<=")
        if op in (">", ">=") and _var_free(bound):  # |x| > b  ->  x < -b or x > b
            return Union(
                (Interval(Neg(_OO), Neg(bound), False, op == ">="), Interval(bound, _OO, op == ">=", False))
            )
    if len(nodes) == 2:
        a, b = nodes
        flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "!=": "!="}
        if isinstance(b, Sym) and _var_free(a):
            a, b, ops = b, a, (flip[ops[0]],)
        if not (isinstance(a, Sym) and _var_free(b)):
            return rel
        op = ops[0]
        if op == "!=":
            return Union((Interval(Neg(_OO), b, False, False), Interval(b, _OO, False, False)))
        if op in ("<", "<="):
            return Interval(Neg(_OO), b, False, op == "<=")
        return Interval(b, _OO, op == ">=", False)
    if len(nodes) == 3 and isinstance(nodes[1], Sym) and _var_free(nodes[0]) and _var_free(nodes[2]):
        if set(ops) <= {"<", "<="}:
            return Interval(nodes[0], nodes[2], ops[0] == "<=", ops[1] == "<=")
        if set(ops) <= {">", ">="}:
            return Interval(nodes[2], nodes[0], ops[1] == ">=", ops[0] == ">=")
    return rel


def canon(ans: Answer) -> Answer:
    """Expand ``\\pm``, turn one-variable inequalities into intervals, flatten unions."""
    if isinstance(ans, Scalar):
        values = expand_pm(ans.node)
        if len(values) == 1:
            return ans
        return Seq("list", tuple(Scalar(v, ans.pct, ans.deg) for v in values))
    if isinstance(ans, Relation):
        return relation_to_set(ans)
    if isinstance(ans, Seq):
        return Seq(ans.kind, tuple(canon(x) for x in ans.items), ans.closers)
    if isinstance(ans, Equation):
        return Equation(ans.lhs, canon(ans.rhs))
    if isinstance(ans, Union):
        parts: list[Answer] = []
        for p in ans.parts:
            c = canon(p)
            parts.extend(c.parts if isinstance(c, Union) else [c])
        return parts[0] if len(parts) == 1 else Union(tuple(parts))
    return ans


def _as_interval(seq: Seq) -> Interval | None:
    if len(seq.items) != 2 or len(seq.closers) != 2 or not all(isinstance(x, Scalar) for x in seq.items):
        return None
    lo, hi = (x.node for x in seq.items)  # type: ignore[union-attr]
    return Interval(lo, hi, seq.closers[0] == "[", seq.closers[1] == "]")


def _is_setlike(ans: Answer) -> bool:
    return isinstance(ans, (Interval, Union)) or (isinstance(ans, Relation))


def _ordered_values(seq: Seq, ordered: bool) -> Seq:
    """``x = 1, y = 2`` as the tuple of values ordered by variable name (or as a plain list)."""
    eqs = sorted(seq.items, key=lambda e: e.lhs.name if ordered else 0)  # type: ignore[union-attr]
    return Seq("tuple" if ordered else "list", tuple(e.rhs for e in eqs))  # type: ignore[union-attr]


def _matching(n: int, ok: Callable[[int, int], bool]) -> bool:
    """Whether a perfect matching exists in the n x n bipartite graph ``ok`` (Kuhn's algorithm)."""
    match: list[int] = [-1] * n

    def augment(i: int, seen: list[bool]) -> bool:
        for j in range(n):
            if ok(i, j) and not seen[j]:
                seen[j] = True
                if match[j] == -1 or augment(match[j], seen):
                    match[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def _is_decimal(node: Node) -> bool:
    if isinstance(node, Neg):
        return _is_decimal(node.x)
    return isinstance(node, Num) and node.decimal


def _has_decimal(node: Node) -> bool:
    return any(isinstance(n, Num) and n.decimal for n in exact.walk(node))


class Comparer:
    """The grading policy over answer structures; value questions go to ``eq`` (exact or sympy)."""

    def __init__(self, eq: NodeEq) -> None:
        self.eq = eq

    def answers(self, ref: Answer, cand: Answer) -> Tri:
        """Whether ``cand`` is equivalent to ``ref``; raises :class:`exact.TooLarge` for oversized values."""
        if ref == cand:
            return True
        return self._compare(canon(ref), canon(cand))

    def _compare(self, ref: Answer, cand: Answer) -> Tri:
        if ref == cand:
            return True
        if isinstance(ref, Equation) or isinstance(cand, Equation):
            return self._equations(ref, cand)
        if isinstance(ref, BaseNum) or isinstance(cand, BaseNum):
            return _base_numbers(ref, cand)
        if isinstance(ref, Text) or isinstance(cand, Text):
            return isinstance(ref, Text) and isinstance(cand, Text) and _same_words(ref.text, cand.text)
        if _is_setlike(ref) or _is_setlike(cand):
            return self._sets(ref, cand)
        if isinstance(ref, Seq) and isinstance(cand, Seq):
            return self._seqs(ref, cand)
        if isinstance(ref, Matrix) or isinstance(cand, Matrix):
            return self._matrices(ref, cand)
        if isinstance(ref, Seq) or isinstance(cand, Seq):
            seq, other = (ref, cand) if isinstance(ref, Seq) else (cand, ref)
            if isinstance(seq, Seq) and len(seq.items) == 1:
                return self._compare(*((seq.items[0], other) if seq is ref else (other, seq.items[0])))
            return False
        if isinstance(ref, Scalar) and isinstance(cand, Scalar):
            return self.scalars(ref, cand)
        return False

    # ------------------------------------------------------------ equations
    def _equations(self, ref: Answer, cand: Answer) -> Tri:
        if isinstance(ref, Equation) and isinstance(cand, Equation):
            if isinstance(ref.lhs, Sym) and isinstance(cand.lhs, Sym):
                return ref.lhs == cand.lhs and self._compare(ref.rhs, cand.rhs)
            if isinstance(ref.rhs, Scalar) and isinstance(cand.rhs, Scalar):
                f = Add((ref.lhs, Neg(ref.rhs.node)))
                g = Add((cand.lhs, Neg(cand.rhs.node)))
                return self.eq.proportional(f, g)
            return False
        if isinstance(cand, Equation):
            if _is_name(cand.lhs):
                return self._compare(ref, cand.rhs)
            if _var_free(cand.lhs) and isinstance(cand.rhs, Scalar):  # "2+3 = 5": consistent, then the value
                return tri_all([self.eq.eq(cand.lhs, cand.rhs.node), self._compare(ref, cand.rhs)])
            if _is_value(ref) and isinstance(cand.rhs, Scalar) and _var_free(cand.rhs.node):
                return self._compare(ref, cand.rhs)  # "a+b+c = 12", "f(2) = 5": the quantity asked for, named
            return False
        assert isinstance(ref, Equation)
        return self._compare(ref.rhs, cand) if _is_name(ref.lhs) else False

    # ------------------------------------------------------------ intervals and unions
    def _sets(self, ref: Answer, cand: Answer) -> Tri:
        ref_parts = self._set_parts(ref)
        cand_parts = self._set_parts(cand)
        if ref_parts is None or cand_parts is None:
            return isinstance(ref, Relation) and isinstance(cand, Relation) and self._relations(ref, cand)
        return self._unordered(ref_parts, cand_parts)

    def _set_parts(self, ans: Answer) -> list[Answer] | None:
        if isinstance(ans, Union):
            parts = [self._set_parts(p) for p in ans.parts]
            return None if any(p is None for p in parts) else [x for p in parts for x in p]  # type: ignore[union-attr]
        if isinstance(ans, Seq) and ans.kind in ("tuple", "bracket"):
            interval = _as_interval(ans)
            return None if interval is None else [interval]
        if isinstance(ans, Seq) and ans.kind == "set":
            return [ans]
        if isinstance(ans, Interval):
            return [ans]
        return None

    def _relations(self, ref: Relation, cand: Relation) -> Tri:
        if ref.ops != cand.ops or len(ref.nodes) != len(cand.nodes):
            return False
        return tri_all(self.eq.eq(a, b) for a, b in zip(ref.nodes, cand.nodes, strict=True))

    def _intervals(self, ref: Interval, cand: Interval) -> Tri:
        if (ref.lo_closed, ref.hi_closed) != (cand.lo_closed, cand.hi_closed):
            return False
        return tri_all(self.eq.eq(a, b) for a, b in ((ref.lo, cand.lo), (ref.hi, cand.hi)))

    # ------------------------------------------------------------ sequences
    def _seqs(self, ref: Seq, cand: Seq) -> Tri:
        ordered = ref.kind in ("tuple", "bracket")
        if cand.kind == "assign":
            cand = _ordered_values(cand, ordered)
        if ref.kind == "assign":
            ref = _ordered_values(ref, True)
            ordered = True
        if len(ref.items) != len(cand.items) or len(cand.items) > MAX_ITEMS:
            return False
        if len(ref.items) == 2 and ref.closers and cand.closers and ref.closers != cand.closers:
            return False  # (a, b) against [a, b]: intervals with different ends
        if ordered:
            return tri_all(self._compare(a, b) for a, b in zip(ref.items, cand.items, strict=True))
        return self._unordered(list(ref.items), list(cand.items))

    def _unordered(self, refs: Sequence[Answer], cands: Sequence[Answer]) -> Tri:
        n = len(refs)
        if n != len(cands) or n > MAX_ITEMS:
            return False
        cache: dict[tuple[int, int], Tri] = {}

        def pair(i: int, j: int) -> Tri:
            if (i, j) not in cache:
                a, b = refs[i], cands[j]
                if isinstance(a, Interval) and isinstance(b, Interval):
                    cache[i, j] = self._intervals(a, b)
                elif isinstance(a, Interval) or isinstance(b, Interval):
                    cache[i, j] = False  # an interval is never a finite set here
                else:
                    cache[i, j] = self._compare(a, b)
            return cache[i, j]

        if _matching(n, lambda i, j: pair(i, j) is True):
            return True
        if not _matching(n, lambda i, j: pair(i, j) is not False):
            return False
        return None

    def _matrices(self, ref: Answer, cand: Answer) -> Tri:
        a, b = _matrix_rows(ref), _matrix_rows(cand)
        if a is None or b is None:
            return False
        if len(a) != len(b) or any(len(r) != len(s) for r, s in zip(a, b, strict=True)):
            if isinstance(ref, Matrix) and isinstance(cand, Matrix):
                return False
            a, b = [[x for r in a for x in r]], [[x for r in b for x in r]]  # a vector against a tuple
            if len(a[0]) != len(b[0]):
                return False
        return tri_all(self.eq.eq(x, y) for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True))

    # ------------------------------------------------------------ single values
    def scalars(self, ref: Scalar, cand: Scalar) -> Tri:
        r, c = ref.node, cand.node
        if r == c:
            return True
        if _opaque_kinds(c) - _opaque_kinds(r):
            return False  # a sum, integral, limit...: the problem's own expression left unevaluated
        if _var_free(r) and exact.operators(c) - exact.operators(r):
            return False  # sin, log, !, binom applied to numbers the reference has already evaluated
        try:
            ref_value = exact.value(r)
            converts = ref.deg != cand.deg and exact.has_const(c, "pi")  # 30 degrees as pi/6
            if ref_value is not None and exact.is_simple(r) and not exact.is_simple(c) and not converts:
                cand_value = exact.value(c)
                closed_form = cand_value is not None and abs(cand_value) >= LARGE and not _has_decimal(c)
                if not closed_form and (not _has_decimal(r) or cand_value is not None):
                    return False  # "3+4", "\sqrt{49}" or "e^{i\pi}" for a plain number: left unevaluated
        except exact.TooLarge:
            return False
        result = tri_any(self.eq.eq(x, y) for x, y in self._variants(ref, cand))
        if result is not True and ref_value and _is_decimal(r) and not _has_decimal(c) and _var_free(c):
            places = max(n.places for n in exact.walk(r) if isinstance(n, Num))
            near = self.eq.near(c, ref_value, places)
            return True if near is True else (result if near is False else None)
        return result

    def _variants(self, ref: Scalar, cand: Scalar) -> list[tuple[Node, Node]]:
        """Value pairs that count as equal: as written, and with %/degrees converted when only one side has them."""
        pairs = [(ref.node, cand.node)]
        hundred = Num(Fraction(100))
        if ref.pct and not cand.pct:
            pairs.append((Div(ref.node, hundred), cand.node))
        if cand.pct and not ref.pct:
            pairs.append((ref.node, Div(cand.node, hundred)))
        if ref.deg and not cand.deg and exact.has_const(cand.node, "pi"):
            pairs.append((Mul((ref.node, _PI_OVER_180)), cand.node))
        if cand.deg and not ref.deg and exact.has_const(ref.node, "pi"):
            pairs.append((ref.node, Mul((cand.node, _PI_OVER_180))))
        return pairs


def _opaque_kinds(node: Node) -> set[str]:
    return {n.kind for n in exact.walk(node) if isinstance(n, Opaque)}


def _is_value(ans: Answer) -> bool:
    """A single number without variables."""
    return isinstance(ans, Scalar) and _var_free(ans.node)


def _is_name(node: Node) -> bool:
    """``x``, ``a_1``, ``AB``, ``\\angle ABC``, ``f(x)``, ``f^{-1}(x)``: the left side of ``name = value``
    (letters, with at most integer exponents)."""
    if isinstance(node, Sym):
        return True
    if isinstance(node, Pow):
        return isinstance(node.base, Sym) and isinstance(node.exp, (Num, Neg))
    return isinstance(node, Mul) and all(_is_name(f) for f in node.factors)


def _matrix_rows(ans: Answer) -> list[list[Node]] | None:
    if isinstance(ans, Matrix):
        return [list(r) for r in ans.rows]
    if (
        isinstance(ans, Seq)
        and ans.kind in ("tuple", "bracket", "list")
        and all(isinstance(x, Scalar) for x in ans.items)
    ):
        return [[x.node for x in ans.items]]  # type: ignore[union-attr]
    return None


_FILLERS = {"the", "a", "an", "it", "is", "answer", "final", "text"}


def _same_words(a: str, b: str) -> bool:
    def key(s: str) -> list[str]:
        return [w for w in s.replace("\\", " ").split() if w not in _FILLERS]

    return key(a) == key(b)


def _base_numbers(ref: Answer, cand: Answer) -> bool:
    """``1011_2`` equals ``1011_{2}`` and the bare digits ``1011``; a base-less reference compares by value."""
    if isinstance(ref, BaseNum):
        if isinstance(cand, BaseNum):
            return (cand.digits, cand.base) == (ref.digits, ref.base)
        return isinstance(cand, Scalar) and _digits_of(cand.node) == ref.digits
    assert isinstance(cand, BaseNum)
    value = exact.value(ref.node) if isinstance(ref, Scalar) else None
    return value is not None and value == int(cand.digits, cand.base)


def _digits_of(node: Node) -> str | None:
    if isinstance(node, Num) and not node.decimal and node.value.denominator == 1:
        return str(node.value.numerator)
    return None

"""The parsed forms: a small expression AST (``Node``) and answer structures (``Answer``).

Both are frozen, hashable dataclasses of plain Python values, so they pickle cheaply to the workers and two
identical answers compare equal without any algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class Num:
    """A literal number; ``decimal`` when written with a decimal point (``0.50``), ``places`` its decimals."""

    value: Fraction
    decimal: bool = False
    places: int = 0


@dataclass(frozen=True, slots=True)
class Sym:
    """A variable, e.g. ``x`` or ``a_1`` (names are lower-cased, like latex2sympy does)."""

    name: str


@dataclass(frozen=True, slots=True)
class Const:
    """``pi``, ``e``, ``i`` (imaginary unit) or ``oo`` (infinity)."""

    name: str


@dataclass(frozen=True, slots=True)
class Add:
    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Mul:
    factors: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Div:
    num: Node
    den: Node


@dataclass(frozen=True, slots=True)
class Neg:
    x: Node


@dataclass(frozen=True, slots=True)
class Pow:
    base: Node
    exp: Node


@dataclass(frozen=True, slots=True)
class Root:
    """``\\sqrt[n]{x}``."""

    x: Node
    n: Node


@dataclass(frozen=True, slots=True)
class Func:
    """A named function: ``sin``, ``log`` (args ``(x, base)``), ``abs``, ``binom``, ``floor``, ``factorial``..."""

    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Mixed:
    """A mixed number ``2\\frac{1}{2}`` = 5/2."""

    whole: Num
    frac: Div


@dataclass(frozen=True, slots=True)
class PlusMinus:
    """``a \\pm b`` (``sign`` +1) or ``a \\mp b`` (-1); expanded into two values before comparison."""

    a: Node | None
    b: Node
    sign: int = 1


@dataclass(frozen=True, slots=True)
class Opaque:
    """An operator we never evaluate in a final answer (``\\sum``, ``\\int``, ``\\lim``, ...): kept as text."""

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class Raw:
    """Text our grammar could not read; the workers try latex2sympy2_extended on it."""

    text: str


Node = Raw | Num | Sym | Const | Add | Mul | Div | Neg | Pow | Root | Func | Mixed | PlusMinus | Opaque


# ---------------------------------------------------------------- answer structures


@dataclass(frozen=True, slots=True)
class Scalar:
    """One value; ``pct`` when written with ``%``, ``deg`` with a degree sign."""

    node: Node
    pct: bool = False
    deg: bool = False


@dataclass(frozen=True, slots=True)
class Seq:
    """Several values. ``kind``: ``list`` (bare, unordered), ``tuple`` (parentheses), ``set`` (braces),
    ``bracket`` (square brackets: a vector or a closed interval). ``closers`` are the bracket characters."""

    kind: str
    items: tuple[Answer, ...]
    closers: str = ""


@dataclass(frozen=True, slots=True)
class Interval:
    lo: Node
    hi: Node
    lo_closed: bool
    hi_closed: bool


@dataclass(frozen=True, slots=True)
class Union:
    """A union of intervals (and finite sets)."""

    parts: tuple[Answer, ...]


@dataclass(frozen=True, slots=True)
class Equation:
    """``lhs = rhs``; ``rhs`` may be a structure (``x = \\{1, 2\\}``)."""

    lhs: Node
    rhs: Answer


@dataclass(frozen=True, slots=True)
class Relation:
    """An inequality chain ``a < x \\le b``: ``ops`` between consecutive ``nodes`` (``<``, ``<=``, ``>``, ``>=``, ``!=``)."""

    ops: tuple[str, ...]
    nodes: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Matrix:
    rows: tuple[tuple[Node, ...], ...]


@dataclass(frozen=True, slots=True)
class Text:
    """A word answer (``Monday``, ``even``), lower-cased with single spaces."""

    text: str


@dataclass(frozen=True, slots=True)
class BaseNum:
    """A number written in base ``base`` (``1011_2``): ``digits`` upper-cased."""

    digits: str
    base: int


Answer = Scalar | Seq | Interval | Union | Equation | Relation | Matrix | Text | BaseNum

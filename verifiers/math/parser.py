"""A bounded recursive-descent parser for the LaTeX of final answers: our own, so it never evaluates anything.

``parse_answer(text)`` reads the structure (lists, tuples, sets, intervals, unions, equations, inequality
chains, matrices) and hands each value to the expression grammar::

    expr    := ['-'|'+'|'\\pm'] term (('+'|'-'|'\\pm'|'\\mp') term)*
    term    := unary (('*'|'\\cdot'|'\\times'|'/'|'\\div') unary | implicit-product postfix)*
    unary   := ('-'|'+') unary | postfix
    postfix := primary ('^' exponent | '!' | "'")*
    primary := number | letter[_sub] | (expr) | {expr} | |expr| | \\frac | \\sqrt | \\binom | function | constant

Limits (:data:`MAX_TOKENS`, :data:`MAX_DEPTH`, :data:`MAX_DIGITS`) make every parse small and quick; past
them, or on anything it does not know, it raises :class:`ParseError` and the caller keeps the text as
:class:`~.nodes.Opaque`/raw for the fallback parser in the workers.
"""

from __future__ import annotations

import re
from fractions import Fraction

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
    Mixed,
    Mul,
    Neg,
    Node,
    Num,
    Opaque,
    PlusMinus,
    Pow,
    Relation,
    Root,
    Scalar,
    Seq,
    Sym,
    Union,
)

MAX_TOKENS = 600
MAX_DEPTH = 40
MAX_DIGITS = 4000

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<cmd>\\[a-zA-Z]+|\\.)|(?P<letter>[a-zA-Z])"
    r"|(?P<op><=|>=|!=|==|[-+*/^_()\[\]{}|,;=<>!':&]))"
)
FUNCTIONS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "lg", "exp", "max", "min", "gcd", "lcm", "det", "arg",
}  # fmt: skip
OPAQUE = {
    "sum",
    "prod",
    "int",
    "iint",
    "iiint",
    "oint",
    "lim",
    "partial",
    "nabla",
    "limsup",
    "liminf",
    "mathrm",
}
_RELOPS = {
    "=": "=", "==": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!=", "\\le": "<=", "\\ge": ">=",
    "\\ne": "!=", "\\in": "in", "\\approx": "~", "\\equiv": "=", "\\to": "=", "\\rightarrow": "=",
    "\\Rightarrow": "=", "\\implies": "=", "\\sim": "~", "\\simeq": "~",
}  # fmt: skip
_OPEN = {"(", "[", "{", "\\{", "\\langle", "\\lfloor", "\\lceil"}
_CLOSE = {")", "]", "}", "\\}", "\\rangle", "\\rfloor", "\\rceil"}
_MATRIX = re.compile(
    r"[(\[]?\s*\\begin\{([pbBvV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}\s*[)\]]?",
    re.DOTALL,
)
_BASE = re.compile(r"\(?([0-9A-Za-z]+)\)?_\{?\(?(\d{1,2})\)?\}?")
_MACRO_ARGS = {"\\frac": 2, "\\binom": 2, "\\sqrt": 1}
_SPECIAL_FUNCS = {"frac", "sqrt", "binom", "lfloor", "lceil", "overline"}
_VALUE_CMDS = {"pi", "infty", "reals"}


class ParseError(ValueError):
    """The text is not an answer our grammar reads (or it is too large); the message says why."""


def tokenize(text: str) -> list[tuple[str, str]]:
    """``[(kind, text)]`` with kind ``num``/``cmd``/``letter``/``op``; commands without the backslash stay whole."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    n = len(text.rstrip())
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}")
        kind = m.lastgroup or "op"
        tok = m.group(kind)
        args = _MACRO_ARGS.get(tokens[-1][1], 0) if tokens else 0
        if kind == "num" and args and len(tok) > 1 and "." not in tok:
            # \frac12 is \frac{1}{2}: each digit of a bare number is one argument
            tokens.extend(("num", d) for d in tok[:args])
            tok = tok[args:]
            if not tok:
                pos = m.end()
                continue
        tokens.append((kind, tok))
        if len(tokens) > MAX_TOKENS:
            raise ParseError(f"answer longer than {MAX_TOKENS} tokens")
        pos = m.end()
    return tokens


def _number(text: str) -> Num:
    if len(text) > MAX_DIGITS:
        raise ParseError(f"number with more than {MAX_DIGITS} digits")
    if "." in text:
        whole, _, frac = text.partition(".")
        places = len(frac)
        value = Fraction(int(whole or "0") * 10**places + int(frac or "0"), 10**places)
        return Num(value, decimal=bool(frac), places=places)
    return Num(Fraction(int(text)))


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks = tokens
        self.i = 0
        self.depth = 0

    # ------------------------------------------------------------------ helpers
    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.toks[j][1] if j < len(self.toks) else ""

    def kind(self) -> str:
        return self.toks[self.i][0] if self.i < len(self.toks) else ""

    def take(self) -> str:
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, tok: str) -> None:
        if self.peek() != tok:
            raise ParseError(f"expected {tok!r}, found {self.peek() or 'end'!r}")
        self.i += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"nesting deeper than {MAX_DEPTH}")

    def matching_close(self) -> tuple[int, bool]:
        """Index of the bracket closing the one at ``self.i`` and whether a top-level comma lies inside."""
        depth = 0
        comma = False
        for j in range(self.i, len(self.toks)):
            tok = self.toks[j][1]
            if tok in _OPEN:
                depth += 1
            elif tok in _CLOSE:
                depth -= 1
                if depth == 0:
                    return j, comma
            elif tok in (",", ";") and depth == 1:
                comma = True
        raise ParseError("unbalanced brackets")

    # ------------------------------------------------------------------ structure
    def answer(self) -> Answer:
        items = [self.item()]
        seps = []
        while self.peek() in (",", ";", "\\lor", "\\land"):
            seps.append(self.take())
            if self.peek() == "":
                break
            items.append(self.item())
        if self.i != len(self.toks):
            raise ParseError(f"unexpected {self.peek()!r}")
        if len(items) == 1:
            return items[0]
        return combine_items(items, seps)

    def item(self) -> Answer:
        first = self.set_expr()
        if self.peek() not in _RELOPS:
            return first
        ops: list[str] = []
        parts: list[Answer] = [first]
        while self.peek() in _RELOPS:
            ops.append(_RELOPS[self.take()])
            parts.append(self.set_expr())
        return relation(ops, parts)

    def set_expr(self) -> Answer:
        left = self.set_atom()
        parts = [left]
        while self.peek() in ("\\cup", "\\setminus"):
            op = self.take()
            right = self.set_atom()
            if op == "\\setminus":
                parts[-1] = remove_points(parts[-1], right)
            else:
                parts.append(right)
        return parts[0] if len(parts) == 1 else Union(tuple(parts))

    def set_atom(self) -> Answer:
        tok = self.peek()
        if tok in ("(", "[", "\\langle"):
            close, comma = self.matching_close()
            if comma and (close + 1 == len(self.toks) or self.toks[close + 1][1] in _STRUCT_FOLLOW):
                return self.bracketed(close)
        if tok == "\\{":
            return self.braced_set()
        if tok == "\\emptyset":
            self.take()
            return Seq("set", ())
        if tok == "\\reals":
            self.take()
            return Interval(Neg(Const("oo")), Const("oo"), False, False)
        return Scalar(self.expr())

    def bracketed(self, close: int) -> Answer:
        opener = self.peek()
        closer = self.toks[close][1]
        items = self.items_until(close)
        self.i = close + 1
        if opener == "\\langle":
            return Seq("tuple", tuple(items), "()")
        pair = ("(" if opener == "(" else "[") + (")" if closer == ")" else "]")
        if len(items) == 2 and pair in ("(]", "[)"):
            lo, hi = (_scalar_node(x) for x in items)
            return Interval(lo, hi, pair[0] == "[", pair[1] == "]")
        return Seq("tuple" if pair == "()" else "bracket", tuple(items), pair)

    def items_until(self, close: int) -> list[Answer]:
        items: list[Answer] = []
        self.enter()
        while self.i < close:
            self.take()  # the opener or a comma
            if self.i == close:
                break
            items.append(self.item())
            if self.i != close and self.peek() not in (",", ";"):
                raise ParseError(f"unexpected {self.peek()!r} in a list")
        self.depth -= 1
        return items

    def braced_set(self) -> Answer:
        depth = 0
        for j in range(self.i, len(self.toks)):
            tok = self.toks[j][1]
            depth += tok in _OPEN
            depth -= tok in _CLOSE
            if depth == 0:
                break
        else:
            raise ParseError("unbalanced \\{")
        items = self.items_until(j)
        self.i = j + 1
        return Seq("set", tuple(items))

    # ------------------------------------------------------------------ expressions
    def expr(self) -> Node:
        self.enter()
        sign = self.take() if self.peek() in ("-", "+", "\\pm", "\\mp") else "+"
        first = self.term()
        node: Node = first
        if sign == "-":
            node = Neg(first)
        elif sign in ("\\pm", "\\mp"):
            node = PlusMinus(None, first, 1 if sign == "\\pm" else -1)
        terms: list[Node] = [node]
        while self.peek() in ("+", "-", "\\pm", "\\mp"):
            op = self.take()
            t = self.term()
            if op in ("\\pm", "\\mp"):
                terms = [PlusMinus(_add(terms), t, 1 if op == "\\pm" else -1)]
            else:
                terms.append(t if op == "+" else Neg(t))
        self.depth -= 1
        return _add(terms)

    def term(self) -> Node:
        factors: list[Node] = [self.unary()]
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times", "\\ast"):
                self.take()
                factors.append(self.unary())
            elif tok in ("/", "\\div", ":"):  # 3:4 is the ratio 3/4
                self.take()
                factors = [Div(_mul(factors), self.unary())]
            elif self.starts_primary():
                nxt = self.postfix()
                if len(factors) == 1 and _is_int(factors[0]) and isinstance(nxt, Div) and _is_int_frac(nxt):
                    factors = [Mixed(factors[0], nxt)]  # type: ignore[arg-type]
                elif isinstance(nxt, Num) and isinstance(factors[-1], Num):
                    raise ParseError("two numbers side by side")
                else:
                    factors.append(nxt)
            else:
                return _mul(factors)

    def starts_primary(self) -> bool:
        kind, tok = self.kind(), self.peek()
        if kind in ("num", "letter"):
            return True
        if tok in ("(", "{", "\\lfloor", "\\lceil"):
            return True
        name = tok[1:]
        return kind == "cmd" and (
            name in FUNCTIONS or name in _SPECIAL_FUNCS or name in _VALUE_CMDS or name in OPAQUE
        )

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            self.enter()
            node = Neg(self.unary())
            self.depth -= 1
            return node
        if self.peek() == "+":
            self.take()
        return self.postfix()

    def postfix(self) -> Node:
        base = self.primary()
        while True:
            tok = self.peek()
            if tok == "^":
                self.take()
                base = Pow(base, self.exponent())
            elif tok == "!":
                self.take()
                base = Func("factorial", (base,))
            elif tok == "'" and isinstance(base, Sym):
                self.take()
                base = Sym(base.name + "'")
            else:
                return base

    def exponent(self) -> Node:
        self.enter()
        tok = self.peek()
        if tok == "{":
            node = self.group("{", "}")
        elif tok in ("-", "+"):
            self.take()
            inner = self.exponent()
            node = Neg(inner) if tok == "-" else inner
        else:
            node = self.primary()
        self.depth -= 1
        return node

    def group(self, open_tok: str, close_tok: str) -> Node:
        self.expect(open_tok)
        node = self.expr()
        self.expect(close_tok)
        return node

    def arg(self) -> Node:
        """A macro argument: ``{...}`` or a single token (``\\frac12``: each digit is one argument)."""
        kind, tok = self.kind(), self.peek()
        if tok == "{":
            return self.group("{", "}")
        if kind == "num":
            self.take()
            return _number(tok)
        return self.primary()

    def primary(self) -> Node:
        self.enter()
        node = self._primary()
        self.depth -= 1
        return node

    def _primary(self) -> Node:
        kind, tok = self.kind(), self.peek()
        if kind == "num":
            self.take()
            return self.repeating(_number(tok))
        if kind == "letter":
            return self.letter()
        if tok in ("(", "["):
            return self.group(tok, ")" if tok == "(" else "]")
        if tok == "{":
            return self.group("{", "}")
        if tok == "|":
            return Func("abs", (self.group("|", "|"),))
        if kind == "cmd":
            return self.command(tok[1:])
        raise ParseError(f"unexpected {tok or 'end'!r}")

    def repeating(self, num: Num) -> Node:
        if self.peek() != "\\overline":
            return num
        self.take()
        digits = (
            self.toks[self.i + 1][1] if self.peek() == "{" and self.i + 2 < len(self.toks) else self.peek()
        )
        self.arg()
        if not digits.isdigit():
            raise ParseError("\\overline over something other than digits")
        return Num(num.value + Fraction(int(digits), (10 ** len(digits) - 1) * 10**num.places))

    def letter(self) -> Node:
        name = self.take().lower()
        if self.peek() == "_":
            self.take()
            sub = self.arg()
            return Sym(f"{name}_{_sub_text(sub)}")
        if name == "e":
            return Const("e")
        if name == "i":
            return Const("i")
        return Sym(name)

    def command(self, name: str) -> Node:
        if name in OPAQUE:
            start = self.i
            self.i = len(self.toks)
            return Opaque(name, "".join(t for _, t in self.toks[start:]))
        self.take()
        if name == "frac":
            return Div(self.arg(), self.arg())
        if name == "sqrt":
            n: Node = Num(Fraction(2))
            if self.peek() == "[":
                n = self.group("[", "]")
            return Root(self.arg(), n)
        if name == "binom":
            return Func("binom", (self.arg(), self.arg()))
        if name in ("lfloor", "lceil"):
            node = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return Func("floor" if name == "lfloor" else "ceiling", (node,))
        if name in ("pi", "infty"):
            return Const("pi" if name == "pi" else "oo")
        if name in FUNCTIONS:
            return self.function(name)
        raise ParseError(f"unknown command \\{name}")

    def function(self, name: str) -> Node:
        power: Node | None = None
        base: Node | None = None
        if self.peek() == "^":
            self.take()
            power = self.exponent()
        if self.peek() == "_" and name == "log":
            self.take()
            base = self.arg()
        if name in ("max", "min", "gcd", "lcm") and self.peek() == "(":
            close, _ = self.matching_close()
            args = tuple(_scalar_node(a) for a in self.items_until(close))
            self.i = close + 1
            node: Node = Func(name, args)
        elif name == "exp":
            node = Pow(Const("e"), self.func_arg())
        else:
            node = Func(
                "log" if name in ("ln", "lg") else name, (self.func_arg(),) + ((base,) if base else ())
            )
            if name == "lg" and base is None:
                node = Func("log", (node.args[0], Num(Fraction(10))))  # type: ignore[union-attr]
        if power is not None:
            if power == Neg(Num(Fraction(1))) and name in ("sin", "cos", "tan"):
                return Func("arc" + name, node.args)  # type: ignore[union-attr]
            return Pow(node, power)
        return node

    def func_arg(self) -> Node:
        """``\\sin(x)``, ``\\sin{x}``, or an implicit product up to the next function: ``\\sin 2x \\cos x``."""
        if self.peek() in ("(", "{"):
            return self.postfix()
        factors = [self.unary()]
        while self.starts_primary() and not (self.kind() == "cmd" and self.peek()[1:] in FUNCTIONS):
            factors.append(self.postfix())
        return _mul(factors)


_STRUCT_FOLLOW = {",", ";", "\\cup", "\\lor", "\\land", "=", "<", ">", "\\le", "\\ge", ")", "]", "\\}"}


def _add(terms: list[Node]) -> Node:
    return terms[0] if len(terms) == 1 else Add(tuple(terms))


def _mul(factors: list[Node]) -> Node:
    return factors[0] if len(factors) == 1 else Mul(tuple(factors))


def _is_int(node: Node) -> bool:
    return isinstance(node, Num) and not node.decimal and node.value.denominator == 1


def _is_int_frac(node: Div) -> bool:
    return _is_int(node.num) and _is_int(node.den)


def _sub_text(node: Node) -> str:
    if isinstance(node, Num):
        return str(node.value)
    if isinstance(node, Sym):
        return node.name
    if isinstance(node, Const):
        return node.name
    return repr(node)


def _scalar_node(item: Answer) -> Node:
    if not isinstance(item, Scalar):
        raise ParseError("expected a value")
    return item.node


def relation(ops: list[str], parts: list[Answer]) -> Answer:
    """An equation, a membership, or an inequality chain from ``a op b op c ...``."""
    if ops == ["in"]:
        return parts[1]
    if "~" in ops:  # x = 1/3 ~ 0.33: the exact value before the approximation; x ~ 0.33: the approximation
        k = ops.index("~")
        exact_part = parts[k]
        if k == 0 and isinstance(exact_part, Scalar) and _is_name_node(exact_part.node):
            return parts[1]
        return relation(ops[:k], parts[: k + 1]) if k else exact_part
    if all(op == "=" for op in ops):
        return Equation(_scalar_node(parts[0]), parts[-1])
    if "=" in ops or "in" in ops:
        raise ParseError("mixed relation chain")
    return Relation(tuple(ops), tuple(_scalar_node(p) for p in parts))


def remove_points(left: Answer, right: Answer) -> Answer:
    """``\\mathbb{R} \\setminus \\{0\\}`` and the like: an interval minus finitely many exact points."""
    if not (isinstance(left, Interval) and isinstance(right, Seq) and right.kind == "set"):
        raise ParseError("unsupported set difference")
    points = sorted({_exact_point(item) for item in right.items})
    parts: list[Answer] = []
    lo, lo_closed = left.lo, left.lo_closed
    for value in points:
        node: Node = Num(value) if value >= 0 else Neg(Num(-value))
        parts.append(Interval(lo, node, lo_closed, False))
        lo, lo_closed = node, False
    parts.append(Interval(lo, left.hi, lo_closed, left.hi_closed))
    return parts[0] if len(parts) == 1 else Union(tuple(parts))


def _exact_point(item: Answer) -> Fraction:
    from .exact import value  # exact imports only nodes: no import cycle

    point = value(_scalar_node(item))
    if point is None:
        raise ParseError("set difference with a non-numeric point")
    return point


def _is_name_node(node: Node) -> bool:
    return isinstance(node, Sym) or (isinstance(node, Mul) and all(isinstance(f, Sym) for f in node.factors))


def combine_items(items: list[Answer], seps: list[str]) -> Answer:
    """A list of values, of assignments (``x = 1, y = 2``), or a union of inequalities joined by "or"."""
    if all(isinstance(x, (Relation, Interval, Union)) for x in items) and set(seps) <= {"\\lor", ","}:
        return Union(tuple(items))
    if isinstance(items[0], Equation) and isinstance(items[0].lhs, Sym):
        first = items[0]
        if all(isinstance(x, Equation) and isinstance(x.lhs, Sym) for x in items):
            names = {x.lhs.name.split("_")[0] for x in items}  # type: ignore[union-attr]
            if len(names) == 1:
                return Seq("list", tuple(x.rhs for x in items))  # type: ignore[union-attr]
            return Seq("assign", tuple(items))
        if not any(isinstance(x, Equation) for x in items[1:]):
            return Seq("list", (first.rhs, *items[1:]))
    return Seq("list", tuple(items))


def _matrix(text: str) -> Answer | None:
    m = _MATRIX.fullmatch(text.strip())
    if m is None:
        return None
    rows = []
    for raw_row in re.split(r"\\\\", m.group(2)):
        if not raw_row.strip() or raw_row.strip() == "\\hline":
            continue
        rows.append(tuple(parse_value(cell) for cell in raw_row.split("&")))
    if not rows or len({len(r) for r in rows}) != 1:
        raise ParseError("ragged matrix")
    return Matrix(tuple(rows))


def _base_number(text: str) -> Answer | None:
    m = _BASE.fullmatch(text.replace(" ", ""))
    if m is None:
        return None
    digits, base = m.group(1).upper(), int(m.group(2))
    if not 2 <= base <= 36 or not any(c.isdigit() for c in digits):
        return None
    try:
        int(digits, base)
    except ValueError:
        return None
    return BaseNum(digits, base)


def parse_value(text: str) -> Node:
    """One value (no structure)."""
    p = _Parser(tokenize(text))
    node = p.expr()
    if p.i != len(p.toks):
        raise ParseError(f"unexpected {p.peek()!r}")
    return node


def parse_answer(text: str) -> Answer:
    """The structure of a normalised answer text; raises :class:`ParseError`."""
    for special in (_matrix, _base_number):
        found = special(text)
        if found is not None:
            return found
    if not text.strip():
        raise ParseError("empty answer")
    return _Parser(tokenize(text)).answer()

"""Normalising one answer's text before parsing: delimiters, fonts, units, separators, %, degrees, words.

Pure string work, linear-ish in the (capped) answer length. The result says what was removed (``pct``,
``deg``, ``approx``) and flags that decide the verdict on their own: ``hedge`` (a hedging word such as "or
possibly", "at least"), ``ellipsis`` (``1, 2, \\ldots``), ``text`` (a word answer such as "Monday").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .extract import _match_brace

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DELIMS = re.compile(r"\$\$?|\\\(|\\\)|\\\[|\\\]")
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lrm]?)(?![a-zA-Z])\s*(\.|\\\{|\\\}|\\[a-zA-Z]+|[()\[\]|])?")
_SPACING = re.compile(r"(?<!\\)\\[,;:> ]|\\quad|\\qquad|\\enspace|\\thinspace|\\medspace|\\thickspace|~")
_NOISE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits|mathstrut|!)(?![a-zA-Z])")
_FRAC_ALIASES = [
    (re.compile(r"\\[dtc]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![a-zA-Z])"), r"\\binom"),
    (re.compile(r"\\(?:leqslant|leq|le)(?![a-zA-Z])"), r" \\le "),
    (re.compile(r"\\(?:geqslant|geq|ge)(?![a-zA-Z])"), r" \\ge "),
    (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])"), r" \\ne "),
    (re.compile(r"\\lt(?![a-zA-Z])"), "<"),
    (re.compile(r"\\gt(?![a-zA-Z])"), ">"),
    (re.compile(r"\\(?:varnothing|emptyset)(?![a-zA-Z])|\\\{\s*\\\}"), r"\\emptyset "),
    (re.compile(r"\\(?:ldots|cdots|dots|dotsc|dotsb)(?![a-zA-Z])|\.\.\."), r" \\ldots "),
    (re.compile(r"\\(?:vee|lor)(?![a-zA-Z])"), r" \\lor "),
    (re.compile(r"\\(?:wedge|land)(?![a-zA-Z])"), r" \\land "),
    (re.compile(r"\\(?:lvert|rvert|vert|mid)(?![a-zA-Z])"), "|"),
    (re.compile(r"\\(?:imath|mathrm\{i\})"), "i"),
    (re.compile(r"\\mathrm\{e\}"), "e"),
    (re.compile(r"\\infin(?:ity)?(?![a-zA-Z])"), r"\\infty "),
    (re.compile(r"\\operatorname\*?\{\s*([a-zA-Z]+)\s*\}"), r"\\\1 "),
    (re.compile(r"\\(?:mathbb|Bbb|mathbf)\{R\}"), r"\\reals "),
]
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree(?:s)?(?![a-zA-Z])|\^\s*\{\s*o\s*\}")
_PERCENT = re.compile(r"\\%|%|\\percent(?![a-zA-Z])")
_CURRENCY = re.compile(r"\\\$|\\(?:euro|pounds?|yen)(?![a-zA-Z])|[\u20ac\u00a3\u00a5]")
_FONT = re.compile(
    r"\\(text|textbf|textit|textrm|textsf|texttt|textnormal|mbox|emph|mathrm|mathbf|mathit|mathsf|mathtt|"
    r"mathnormal|boldsymbol|bm|mathcal|mathscr|pmb|hbox|underline|textup)\s*\{"
)
_TEXT_FONTS = {
    "text",
    "textbf",
    "textit",
    "textrm",
    "textsf",
    "texttt",
    "textnormal",
    "mbox",
    "emph",
    "hbox",
    "textup",
}
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACE_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:\s\d{3})+(?:\.\d+)?")
_SCI = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_WORD = re.compile(
    r"(?<![\\a-zA-Z])(?<!\\begin\{)(?<!\\end\{)([a-zA-Z]{2,})(?![a-zA-Z])(\s*\^\s*(?:\{\s*\d\s*\}|\d))?"
)
_UNION_U = re.compile(r"([)\]])\s*U\s*([(\[])")
# "(i.e. 0.5)", "(in simplest form)": a remark in words after the answer
_TRAILING_REMARK = re.compile(r"\s*\(\s*(?:i\.\s?e\.|e\.\s?g\.|[a-zA-Z]{2,}\b)[^()]*\)\s*$")
_APPROX = re.compile(r"^\s*(?:\\approx|\\sim|\\simeq)\s*")
_NAMES = re.compile(
    r"(?:m\s*)?\\(?:angle|measuredangle|triangle|overline|overarc|widehat|arc)(?![a-zA-Z])(?!\s*\{?\s*\d)"
)
_CHOICE = re.compile(r"^\s*\(?\s*([A-Ea-e])\s*\)(?:\s|$|[:.])|^\s*([A-E])\s*$")

FUNCTION_WORDS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "exp", "sqrt", "pi", "infty", "max", "min", "gcd", "lcm", "lim", "sum", "int", "det",
}  # fmt: skip
_WORD_COMMANDS = {"infinity": r"\infty", "inf": r"\infty", "infinite": r"\infty"}
CONNECTORS = {"or": r" \lor ", "and": r" \land "}
HEDGE_WORDS = {
    "either", "maybe", "possibly", "perhaps", "probably", "likely", "unsure", "guess", "between", "least",
    "most", "more", "less", "otherwise", "alternatively", "any", "some", "not", "none", "unknown", "cannot",
}  # fmt: skip
APPROX_WORDS = {"approximately", "approx", "about", "around", "roughly", "nearly", "circa", "almost"}
FILLER_WORDS = {
    "the", "answer", "answers", "is", "are", "final", "thus", "so", "therefore", "hence", "we", "get", "have",
    "then", "value", "equals", "which", "gives", "solution", "solutions", "result",
    "of", "to", "at", "on", "be", "by", "it", "an", "as", "if", "do", "me", "my", "us", "there",
}  # fmt: skip
UNITS = {
    "mm", "cm", "dm", "km", "m", "g", "kg", "mg", "s", "l", "ml", "h", "hr", "hrs", "sec", "secs", "min",
    "mins", "ft", "in", "yd", "mi", "mph", "kph", "kmh", "lb", "lbs", "oz", "units", "unit", "sq", "square",
    "cubic", "cu", "meter", "meters", "metre", "metres", "centimeter", "centimeters", "millimeters",
    "kilometers", "kilometer", "feet", "foot", "inch", "inches", "yard", "yards", "mile", "miles", "hour",
    "hours", "minute", "minutes", "second", "seconds", "day", "days", "week", "weeks", "month", "months",
    "year", "years", "dollar", "dollars", "cent", "cents", "usd", "rad", "radian", "radians", "degree",
    "degrees", "deg", "grams", "gram", "kilograms", "liters", "litres", "liter", "gallons", "gallon",
    "people", "persons", "ways", "times", "pounds", "ounces", "points", "steps", "students", "cm2", "m2",
}  # fmt: skip
_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]  # fmt: skip
TEXT_SYNONYMS = {
    "no solution": r"\emptyset", "no solutions": r"\emptyset", "no real solutions": r"\emptyset",
    "no real solution": r"\emptyset", "empty set": r"\emptyset", "all real numbers": r"\reals",
    "all reals": r"\reals", "dne": "does not exist", "true": "yes", "false": "no",
    **{word: str(k) + " " for k, word in enumerate(_NUMBER_WORDS)},
}  # fmt: skip


@dataclass(frozen=True)
class Normalized:
    """An answer text ready for the parser, and what normalisation learned about it."""

    text: str
    pct: bool = False
    deg: bool = False
    approx: bool = False
    hedge: str | None = None
    ellipsis: bool = False
    words: str | None = None  # set for a word answer: lower-cased words
    choice: str | None = None  # a multiple-choice letter such as "C"


def _unwrap_command(
    text: str, pattern: re.Pattern[str], keep: bool = True
) -> tuple[str, list[tuple[str, str]]]:
    """Replace every ``\\cmd{content}`` matched by ``pattern`` with its content; returns (text, [(cmd, content)])."""
    found: list[tuple[str, str]] = []
    for _ in range(200):  # bounded: each round removes one command
        m = pattern.search(text)
        if m is None:
            break
        end = _match_brace(text, m.end() - 1)
        if end is None:
            text = text[: m.start()] + text[m.end() :]
            continue
        content = text[m.end() : end - 1]
        cmd = m.group(1) if m.groups() else ""
        found.append((cmd, content))
        text = text[: m.start()] + (_font_replacement(cmd, content) if keep else "") + text[end:]
    return text, found


def _font_replacement(cmd: str, content: str) -> str:
    if cmd in _TEXT_FONTS:
        word = content.strip().lower()
        if word in UNITS or word.rstrip("s") in UNITS:
            return f" \\unit{{{word}}} "
        return f" {content} "
    return content


def _strip_wrappers(text: str) -> str:
    text = text.strip()
    for _ in range(5):
        m = _BOXED.match(text)
        if m is None:
            break
        end = _match_brace(text, m.end() - 1)
        if end is None or text[end:].strip():
            break
        text = text[m.end() : end - 1].strip()
    text = _DELIMS.sub(" ", text)
    text = text.replace("**", " ").replace("__", " ")
    return text.strip()


def _basic(text: str) -> str:
    text = _SIZING.sub(lambda m: "" if m.group(1) in (None, ".") else m.group(1), text)
    text = _NOISE.sub("", text)
    text = _SPACING.sub(" ", text)
    for pattern, repl in _FRAC_ALIASES:
        text = pattern.sub(repl, text)
    return text.replace("{,}", "").replace("\\{,\\}", "")


def _strip_end(text: str) -> str:
    text = text.strip()
    while text and text[-1] in ".,;:" and not text.endswith("\\ldots"):
        text = text[:-1].rstrip()
    while text.startswith("="):
        text = text[1:].lstrip()
    return text


@dataclass
class _Words:
    hedge: str | None = None
    approx: bool = False
    deg: bool = False
    pct: bool = False
    other: int = 0  # words that are neither maths, units, fillers nor connectors


def _classify_word(word: str, acc: _Words) -> str:
    """What replaces one plain word in the maths: a command, a connector, nothing (units, fillers), or itself."""
    low = word.lower()
    if low in FUNCTION_WORDS:
        return f"\\{low} "
    if low in _WORD_COMMANDS:
        return _WORD_COMMANDS[low] + " "
    if low in CONNECTORS:
        return CONNECTORS[low]
    if low in HEDGE_WORDS:
        acc.hedge = acc.hedge or low
        return " "
    if low in APPROX_WORDS:
        acc.approx = True
        return " "
    if low in ("degree", "degrees", "deg"):
        acc.deg = True
        return " "
    if low == "percent":
        acc.pct = True
        return " "
    if low in FILLER_WORDS or low in UNITS or (low.endswith("s") and low[:-1] in UNITS):
        return " "
    if len(low) <= 2:  # "ab": a product of two variables
        return word
    acc.other += 1
    return " "


def _replace_word(m: re.Match[str], acc: _Words) -> str:
    """A plain word with an optional exponent (``cm^2``): a unit disappears with its exponent."""
    word, power = m.group(1), m.group(2) or ""
    out = _classify_word(word, acc)
    return out + power if out == word or out.startswith("\\") else out


def _words_only(text: str) -> str | None:
    """The lower-cased words of ``text`` when it has no maths at all (digits, commands, operators)."""
    plain = re.sub(r"[\s.,;:!?'\"()\-]+", " ", text).strip().lower()
    if not plain or not re.fullmatch(r"[a-z]+(?: [a-z]+)*", plain):
        return None
    if len(plain) == 1 or (len(plain.split()) == 1 and len(plain) <= 2):
        return None  # "x", "ab": maths
    if plain.split()[0] in FUNCTION_WORDS or plain in FUNCTION_WORDS:
        return None
    return plain


def _separators(text: str) -> str:
    stripped = text.strip().lstrip("\\$ ").strip()
    if _THOUSANDS.fullmatch(stripped):
        return stripped.replace(",", "")
    if _SPACE_THOUSANDS.fullmatch(stripped):
        return re.sub(r"\s", "", stripped)
    return text


def normalize(answer: str) -> Normalized:
    """Normalise one answer (from a response or a reference) for :func:`parser.parse_answer`."""
    text = _basic(_strip_wrappers(answer))
    text, _ = _unwrap_command(text, _FONT)
    text = _basic(text)
    approx = _APPROX.match(text) is not None
    text = _NAMES.sub(" ", _APPROX.sub("", text))
    choice_m = _CHOICE.match(text)
    choice = (choice_m.group(1) or choice_m.group(2)).upper() if choice_m else None
    if choice_m is not None and choice_m.group(1) and text[choice_m.end() :].strip():
        text = text[choice_m.end() :]  # "(C) 12": the value after the option letter
    deg = bool(_DEGREE.search(text))
    text = _DEGREE.sub(" ", text)
    pct = bool(_PERCENT.search(text))
    text = _PERCENT.sub(" ", text)
    text = _CURRENCY.sub(" ", text)
    text = _SCI.sub(r"\1\\times 10^{\2}", text)
    ellipsis = "\\ldots" in text
    text = _strip_end(text)
    words = _words_only(text)
    if words is not None:
        synonym = TEXT_SYNONYMS.get(words)
        if synonym is None or synonym[0].isalpha():
            return Normalized(text, words=synonym or words, choice=choice)
        text = synonym.strip()
    acc = _Words()
    _WORD.sub(lambda m: _replace_word(m, acc), text)  # hedging words anywhere, remarks included
    hedge = acc.hedge
    text = _UNION_U.sub(r"\1 \\cup \2", _TRAILING_REMARK.sub("", text))
    acc = _Words(hedge=hedge)
    text = _WORD.sub(lambda m: _replace_word(m, acc), text)
    text = re.sub(r"\\unit\{[^{}]*\}(?:\s*\^\s*(?:\{\s*\d\s*\}|\d))?", " ", text)
    if acc.other and re.search(r"[0-9\\]", text) is None:
        return Normalized(text, words=" ".join(text.lower().split()), choice=choice)
    text = _separators(_strip_end(" ".join(text.split())))
    return Normalized(
        text,
        pct=pct or acc.pct,
        deg=deg or acc.deg,
        approx=acc.approx or approx,
        hedge=acc.hedge,
        ellipsis=ellipsis,
        choice=choice,
    )

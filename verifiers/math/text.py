"""Sanitising untrusted response text: invisible and control characters out, Unicode maths to LaTeX."""

from __future__ import annotations

import re

# Zero-width and bidi-control characters: invisible, so a model could use them to hide text from the checks.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufe00-\ufe0f]"
)
# C0/C1 control characters except tab and newline (null bytes included).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_UNICODE_MATH = {
    "\u03c0": r"\pi ",
    "\u221a": r"\sqrt",
    "\u00d7": r"\times ",
    "\u00b7": r"\cdot ",
    "\u22c5": r"\cdot ",
    "\u2212": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2260": r"\ne ",
    "\u2248": r"\approx ",
    "\u221e": r"\infty ",
    "\u222a": r"\cup ",
    "\u2229": r"\cap ",
    "\u00b1": r"\pm ",
    "\u2213": r"\mp ",
    "\u00b0": r"^\circ ",
    "\u2208": r"\in ",
    "\u2205": r"\emptyset ",
    "\u00f7": r"\div ",
    "\u211d": r"\mathbb{R}",
    "\u2026": r"\ldots ",
    "\u00bd": r"\frac{1}{2}",
    "\u2153": r"\frac{1}{3}",
    "\u2154": r"\frac{2}{3}",
    "\u00bc": r"\frac{1}{4}",
    "\u00be": r"\frac{3}{4}",
    "\uff0c": ",",
    "\uff1a": ":",
    "\u3002": ".",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
    "\u2032": "'",
}
_SUPERSCRIPTS = dict(
    zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b", "0123456789-", strict=True)
)
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE_MATH)))
_SUPER_RE = re.compile("[" + "".join(_SUPERSCRIPTS) + "]+")
# Full-width digits and letters (U+FF10..) map to ASCII.
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}


def sanitize(text: str) -> str:
    """Remove invisible and control characters and map common Unicode maths to LaTeX.

    >>> sanitize("x\u00b2 + 3\u200b\u00b7\u03c0")
    'x^{2} + 3\\\\cdot \\\\pi '
    """
    text = _CONTROL.sub("", _INVISIBLE.sub("", text))
    if text.isascii():
        return text
    text = text.translate(_FULLWIDTH)
    text = _SUPER_RE.sub(lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group()) + "}", text)
    return _UNICODE_RE.sub(lambda m: _UNICODE_MATH[m.group()], text)

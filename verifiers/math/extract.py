"""Finding the final answer in a response, and rejecting several different final answers.

The *last* final answer counts: the last ``\\boxed{}``/``\\fbox{}`` or ``Answer:`` line (DAPO-Math-17k
format, ``**Answer:**`` too); only when there is neither, the last clear final sentence ("the final answer is
...").  A truncated or empty last box is no answer.  Different answers placed next to each other (``\\boxed{3}
or \\boxed{4}``) are a hedge, unless the reference itself lists several values (then they form one list);
too many boxes or too many different final answers in one response are rejected outright.
All scans are linear in the text length (boxes are capped before any brace matching).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")
_ANSWER_LINE = re.compile(
    r"^[ \t>#*_\-]*(?:\*\*|__)?[ \t]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*[:\uff1a][ \t]*(?:\*\*|__)?([^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE = re.compile(
    r"\b(?:final answer|the answer|answer)[ \t]*(?:is|=|:)[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE
)
_EXPLANATION = re.compile(r",?\s+(?:because|since|which|where|as|so|given|from|by)\s", re.IGNORECASE)
_BOX_SUFFIX = re.compile(
    r"\$?[ \t]*(?:\^\s*\{?\s*\\circ\s*\}?|\u00b0|\\degree\b|degrees?\b|(\\%|%|percent\b))", re.IGNORECASE
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CONCLUSION = re.compile(
    r"(?:therefore|thus|hence|so|finally|consequently|in conclusion)\b[^=]*?"
    r"(?:\b(?:is|are|equals|was|be)\b|=)\s*((?:(?!\b(?:is|are|equals)\b)[^=])+?)\s*$",
    re.IGNORECASE,
)
_PHRASED = re.compile(r"^[A-Za-z][A-Za-z ,'()]*?\b(?:is|are|equals|=)\s+(.+)$")
_NEXT_LINE = re.compile(r"\n\s*(\S[^\n]*)")
_BARE_ARG = re.compile(r"[ \t]*(-?\d+(?:\.\d+)?|\\[a-zA-Z]+|[^\s{])")
_CORRECTION = re.compile(
    r"\b(?:wait|actually|mistake|error|wrong|incorrect|re-?check|double[- ]check|verify|verif\w+|re-?comput\w*|"
    r"recalculat\w*|reconsider\w*|correct\w*|however|but|oops|hmm|let me|let's|re-?evaluat\w*)\b",
    re.IGNORECASE,
)
_HEDGE_WORDS = re.compile(
    r"\b(?:or|alternatively|possibly|perhaps|maybe|either|also|another|could|might)\b", re.IGNORECASE
)
# Words that lead from one result to the next (an intermediate value, then the final one): not a hedge.
_PROGRESSION = re.compile(
    r"\b(?:thus|therefore|hence|so|giving|gives|final|finally|total|sum|overall|then|which|means)\b",
    re.IGNORECASE,
)
_GLUE_STRIP = re.compile(r"[\s$.,;:()\[\]*]|\\[,;:! ]|\\quad|\\qquad|\\\(|\\\)|\\\[|\\\]")
_ADJACENT_CHARS = 60
_HEDGE_GAP_CHARS = 300


@dataclass(frozen=True)
class Span:
    """One final-answer candidate: where it is and its text (None when a box is cut off)."""

    start: int
    end: int
    text: str | None
    kind: str  # "boxed" | "line" | "sentence"


@dataclass(frozen=True)
class Extraction:
    """The last final answer, the different answers placed next to it, and why there is none when so."""

    answer: str | None
    group: tuple[str, ...] = ()
    error: str | None = None
    distinct: int = 0


def _match_brace(text: str, open_pos: int) -> int | None:
    """Index just past the ``}`` matching ``text[open_pos] == '{'``; None when the text ends first."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def find_boxes(text: str) -> list[Span]:
    """Every outermost ``\\boxed``/``\\fbox`` with its content; nested boxes are part of their parent."""
    spans: list[Span] = []
    covered_until = -1
    for m in _BOX.finditer(text):
        if m.start() < covered_until:
            continue
        pos = m.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "[":  # \framebox[width]{...}
            close = text.find("]", pos)
            pos = close + 1 if close != -1 else len(text)
        if pos < len(text) and text[pos] == "{":
            end = _match_brace(text, pos)
            if end is None:
                spans.append(Span(m.start(), len(text), None, "boxed"))
                break
            content = text[pos + 1 : end - 1]
            suffix = _BOX_SUFFIX.match(text, end)
            if suffix is not None:  # "\boxed{60}^\circ", "$\boxed{50}$\%", "$\boxed{60}$ degrees"
                content += "^\\circ" if suffix.group(1) is None else "\\%"
                end = suffix.end()
            spans.append(Span(m.start(), end, content, "boxed"))
            covered_until = end
            continue
        bare = _BARE_ARG.match(text, pos)
        if bare is None:
            spans.append(Span(m.start(), len(text), None, "boxed"))
            break
        spans.append(Span(m.start(), bare.end(), bare.group(1), "boxed"))
        covered_until = bare.end()
    return spans


def _cut_sentence(text: str) -> str:
    """The first sentence of ``text``: up to a period followed by space or end, outside ``$...$`` and braces."""
    depth = 0
    in_math = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "$":
            in_math = not in_math
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "." and not in_math and depth <= 0 and (i + 1 == n or text[i + 1].isspace()):
            return text[:i]
        i += 1
    return text


def _clean_inline(text: str) -> str:
    """An ``Answer:`` line or sentence tail without markdown, a leading "the final answer is", a trailing
    explanation ("because ...", ", which ...") and a period."""
    text = text.strip().strip("*_").strip()
    inner = _SENTENCE.search(text)
    if inner is not None and inner.start() < 40:
        text = inner.group(1)
    else:
        phrased = _PHRASED.match(text)  # "The number of apples is 6."
        text = phrased.group(1) if phrased is not None else text
    text = _cut_sentence(text)
    explained = _EXPLANATION.search(text)
    if explained is not None and text[: explained.start()].count("$") % 2 == 0:
        text = text[: explained.start()]
    return text.strip().strip("*_").strip().rstrip(".,").strip()


def find_answer_lines(text: str) -> list[Span]:
    """``Answer: ...`` lines (an empty one takes the next non-empty line) that do not contain a box."""
    spans = []
    for m in _ANSWER_LINE.finditer(text):
        content, end = m.group(1), m.end()
        if not content.strip().strip("*_$").strip():
            nxt = _NEXT_LINE.match(text, end)
            if nxt is None:
                continue
            content, end = nxt.group(1), nxt.end()
        if _BOX.search(content):
            continue
        cleaned = _clean_inline(content)
        if cleaned:
            spans.append(Span(m.start(), end, cleaned, "line"))
    return spans


def find_conclusion(text: str) -> list[Span]:
    """The response's last sentence when it concludes with a value: "Therefore, the total is $34$."."""
    stripped = text.rstrip()
    start = stripped.rfind("\n") + 1
    last_line = stripped[start:]
    if len(last_line) > 600:
        return []
    sentences = _SENTENCE_SPLIT.split(last_line)
    sentence = sentences[-1] if sentences[-1].strip(" .$") else (sentences[-2] if len(sentences) > 1 else "")
    m = _CONCLUSION.match(sentence.strip())
    if m is None:
        return []
    value = m.group(1).strip().rstrip(".").strip()
    if value.count("$") % 2:
        value = value.replace("$", "")
    return [Span(start, len(stripped), value, "sentence")] if 0 < len(value) <= 100 else []


def find_sentences(text: str) -> list[Span]:
    """ "The (final) answer is ..." sentences, for responses with neither a box nor an ``Answer:`` line."""
    spans = []
    for m in _SENTENCE.finditer(text):
        cleaned = _clean_inline(m.group(1))
        if cleaned and len(cleaned) <= 200:
            spans.append(Span(m.start(), m.end(), cleaned, "sentence"))
    return spans


def _is_adjacent(gap: str) -> bool:
    """Whether two answers with this text between them are offered side by side (a hedge), not a correction."""
    if _CORRECTION.search(gap):
        return False
    bare = _GLUE_STRIP.sub("", gap)
    if len(bare) <= _HEDGE_GAP_CHARS and _HEDGE_WORDS.search(gap) is not None:
        return True
    return len(bare) <= _ADJACENT_CHARS and _PROGRESSION.search(gap) is None


def _key(answer: str) -> str:
    return "".join(answer.split()).strip("$").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def extract(text: str, *, max_boxes: int, max_distinct: int) -> Extraction:
    """The last final answer of ``text`` (already sanitised), with its adjacent group of other answers."""
    n_boxes = sum(1 for _ in zip(range(max_boxes + 1), _BOX.finditer(text), strict=False))
    if n_boxes > max_boxes:
        return Extraction(None, error=f"reward hacking: more than {max_boxes} boxed answers")
    spans = sorted(find_boxes(text) + find_answer_lines(text), key=lambda s: s.start)
    if not spans:
        spans = find_sentences(text)[-1:] or find_conclusion(text)
    if not spans:
        return Extraction(None, error="no final answer found")
    last = spans[-1]
    if last.text is None:
        return Extraction(None, error="truncated \\boxed{...}: the response ends inside the final answer")
    if not last.text.strip().strip("$").strip():
        return Extraction(None, error="empty \\boxed{}")
    distinct = len({_key(s.text) for s in spans if s.text})
    if distinct > max_distinct:
        return Extraction(
            None, error=f"reward hacking: {distinct} different final answers", distinct=distinct
        )
    group = [last.text.strip()]
    for prev, cur in zip(reversed(spans[:-1]), reversed(spans[1:]), strict=True):
        if prev.text is None or not prev.text.strip() or not _is_adjacent(text[prev.end : cur.start]):
            break
        group.insert(0, prev.text.strip())
    unique = tuple(dict.fromkeys(group, None))
    return Extraction(last.text.strip(), group=unique, distinct=distinct)

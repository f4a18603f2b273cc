"""Adversarial inputs for the math verifier: code injection, expression bombs, deep nesting, huge and odd text.

``adversarial_inputs(marker)`` returns ``(name, response, reference)`` triples; ``marker`` is a file path that
the injection payloads try to create (the test checks it never appears). Every input must get a verdict,
``correct=False`` (none of them is a right answer), within the time limit, without the verifier dying.
"""

from __future__ import annotations

INJECTION_TEMPLATES = [
    "__import__('os').system('touch {m}')",
    '__import__("os").system("touch {m}")',
    "eval(\"__import__('os').system('touch {m}')\")",
    "exec(\"open('{m}', 'w').write('x')\")",
    "open('{m}', 'w').write('pwned')",
    "(lambda: __import__('os').system('touch {m}'))()",
    "().__class__.__bases__[0].__subclasses__()",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{m}'])",
    "Symbol('x').__class__.__mro__[-1].__subclasses__()",
    "globals()['__builtins__']['__import__']('os').system('touch {m}')",
    "getattr(__import__('os'), 'system')('touch {m}')",
    "__import__('subprocess').call(['touch', '{m}'])",
    "__import__('pathlib').Path('{m}').touch()",
    "compile('open(\\'{m}\\',\\'w\\')', 'x', 'exec')",
    "\\input{{/etc/passwd}}",
    "\\immediate\\write18{{touch {m}}}",
    "\\write18{{touch {m}}}",
    "$(touch {m})",
    "`touch {m}`",
    "5; import os; os.system('touch {m}')",
    "x if __import__('os').system('touch {m}') else 5",
    "Integer(5).__class__.__init__.__globals__['__builtins__']['eval']('1')",
    "\\text{{__import__('os').system('touch {m}')}}",
    "\\operatorname{{eval}}(\"__import__('os').system('touch {m}')\")",
    "{{{{__import__('os').system('touch {m}')}}}}",
    "\\mathrm{{exec}}(open('{m}','w'))",
    "lambda x: __import__('os').system('touch {m}')",
    'sympify(\'__import__("os").system("touch {m}")\')',
    'parse_value(\'__import__("os").system("touch {m}")\')',
    'S(\'__import__("os").system("touch {m}")\')',
]

BOMBS = [
    "9^{9^{9^9}}", "9^9^9^9", "2^{2^{2^{2^{2^{2}}}}}", "10^{10^{100}}", "(10^{10})^{10^{10}}", "x^{9^{9^9}}",
    "e^{e^{e^{e^{10}}}}", "\\sqrt[10^{100}]{2}", "2^{-10^{100}}", "1.0000001^{10^{100}}", "9**9**9",
    "10^{10^{10}} - 10^{10^{10}}", "(9^{9})^{9^{9}}", "2^{3^{4^{5}}}", "\\pi^{10^{100}}", "i^{10^{100}}",
    "100000!", "(10^6)!", "10^{100}!", "9!!!!!!!!!!", "\\Gamma(10^9)", "\\binom{10^9}{5\\cdot 10^8}",
    "10!^{10!}", "(2^{1000})!", "\\sin(10^{10^{10}})", "\\tan(\\pi/2)", "\\frac{1}{0}", "0^0", "\\log 0",
    "\\infty - \\infty", "\\frac{0}{0}", "(x+1)^{100000}", "\\frac{1}{x-x}", "\\operatorname{foo}(9^{9^{9^9}})",
    "\\mathrm{f}(9^{9^{9^9}})", "\\sum_{k=1}^{10^{100}} k", "\\prod_{k=1}^{10^{10}} k", "\\int_0^{10^{100}} e^{x^2} dx",
    "\\lim_{n\\to\\infty} n^{n^n}", "\\begin{pmatrix} 9^{9^9} & 1 \\\\ 1 & 9^{9^9} \\end{pmatrix}",
    "\\{9^{9^{9^9}}, 8^{8^{8^8}}\\}", "(9^{9^{9^9}}, 1]", "x = 9^{9^{9^9}}", "9^{9^{9^9}} \\pm 1",
    "\\frac{9^{9^{9^9}}}{9^{9^{9^9}}}", "1" + "0" * 3999, "9" * 5000, "(" + "9" * 3999 + ")^{1000}",
    "\\sqrt{" + "9" * 3999 + "}", "0.\\overline{" + "9" * 3000 + "}", "2^{" + "9" * 3000 + "}",
]  # fmt: skip


def _nest(open_: str, close: str, depth: int, core: str = "1") -> str:
    return open_ * depth + core + close * depth


NESTING = [
    _nest("{", "}", 5000),
    _nest("(", ")", 5000),
    _nest("[", "]", 5000),
    _nest("\\frac{1}{", "}", 5000),
    _nest("\\sqrt{", "}", 5000),
    _nest("x^{", "}", 5000),
    _nest("\\left(", "\\right)", 5000),
    _nest("\\{", "\\}", 5000),
    _nest("|", "|", 5000),
    _nest("\\text{", "}", 5000),
    "-" * 5000 + "1",
    "+" * 5000 + "1",
    "!" * 5000,
    "1" + "^1" * 5000,
    "\\sqrt" * 5000 + "2",
    "\\frac" * 5000 + "12",
    _nest("{", "}", 200),
    _nest("(", ")", 200),
    _nest("\\frac{1}{", "}", 60),
    _nest("\\boxed{", "}", 5000, "5"),
]


def _wrap(ans: str) -> str:
    return f"The final answer is $\\boxed{{{ans}}}$."


def _big_texts() -> list[tuple[str, str]]:
    mb = 1_000_000
    return [
        ("1MB digits in box", _wrap("1" * mb)),
        ("1MB letters in box", _wrap("a" * mb)),
        ("1MB text then box", "x" * mb + _wrap("5")),
        ("1MB spaces then answer", " " * mb + "\nAnswer: 5"),
        ("1MB of dollars", "$" * mb),
        ("1MB of backslashes", "\\" * mb),
        ("1MB of open braces in box", "\\boxed{" + "{" * mb),
        ("1MB of escaped braces", "\\boxed{" + "\\}" * (mb // 2) + "}"),
        ("1MB Answer: prefix spaces", "Answer:" + " " * mb + "5"),
        ("1MB stars", "*" * mb + "Answer: 5"),
        ("1MB of 'the answer is'", "the answer is " * (mb // 14)),
        ("1MB newlines", "\n" * mb + "\\boxed{5}"),
        ("1MB zero-width", "\u200b" * mb + "\\boxed{5}"),
        ("1MB null bytes", "\x00" * mb + "\\boxed{5}"),
        ("1MB of Answer lines", "Answer: 5\n" * (mb // 10)),
        ("1MB of sentences", "The final answer is 5. " * (mb // 23)),
        ("200k answer-line content", "Answer: " + "5" * 200_000),
        ("long list", _wrap(", ".join(str(k) for k in range(10_000)))),
        ("long sum", _wrap("+".join(["1"] * 20_000))),
        ("long product", _wrap("\\cdot".join(["2"] * 20_000))),
    ]


def _boxes() -> list[tuple[str, str]]:
    return [
        ("10000 boxes", "\\boxed{1}" * 10_000),
        ("10000 same boxes", "\\boxed{5} " * 10_000),
        ("10000 nested boxes", _nest("\\boxed{", "}", 10_000, "5")),
        ("10000 fbox", "\\fbox{5}" * 10_000),
        ("10000 bare boxes", "\\boxed 5 " * 10_000),
        ("10000 empty boxes", "\\boxed{}" * 10_000),
        ("10000 answer lines", "".join(f"Answer: {k}\n" for k in range(10_000))),
        ("5000 boxes, last right", "\\boxed{4}" * 5_000 + "\\boxed{5}"),
        ("21 boxes", "\\boxed{5}" * 21),
        ("boxes of injections", "".join(f"\\boxed{{{k}}}" for k in range(100))),
    ]


CONTROL = [
    "5\x00", "\x005", "5\x00 or 6", "\x1b[31m5\x1b[0m", "5\u200b", "\u200b5", "5\u200b or\u200b 6", "\u202e5",
    "\ufeff5", "5\u2060", "5\r\n", "\x07\x08\x0b\x0c5", "5\x7f", "\x85 5", "\ud8005", "5\udfff", "\u00ad5",
    "\u0305\u03055", "\U0001f600", "5\U0001f600", "\u0665", "\u2212\u2212\u22125", "\\boxed{\x00}",
    "\u200b\u200c\u200d\u2060\ufeff",
]  # fmt: skip

ODD_LATEX = [
    "\\boxed{", "}\\boxed{5", "\\boxed}}}{{{5", "\\left(\\right(", "\\frac{}{}", "\\sqrt[]{}", "^^^^", "____",
    "\\\\\\\\", "\\begin{pmatrix}", "\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3\\end{pmatrix}",
    "\\begin{array}{cc}" + "1&" * 2000 + "1\\end{array}", "$$$$", "\\(\\)", "\\[\\]", "%%%%", "#####",
    "&&&&", "~~~~", "\\def\\x{\\x}\\x", "\\newcommand{\\a}{\\a}\\a", "\\catcode`\\{=12", "\\csname relax\\endcsname",
    "\\expandafter\\x", "\\loop\\repeat", "\\@@", "\\x" * 3000, "\\frac{1}{2" * 1000, "}" * 5000,
]  # fmt: skip


def adversarial_inputs(marker: str) -> list[tuple[str, str, str]]:
    """Every adversarial case as ``(name, response, reference)``."""
    cases: list[tuple[str, str, str]] = []
    for k, template in enumerate(INJECTION_TEMPLATES):
        payload = template.format(m=marker)
        cases.append((f"injection-{k}-boxed", _wrap(payload), "5"))
        cases.append((f"injection-{k}-answer-line", f"Answer: {payload}", "5"))
        cases.append((f"injection-{k}-as-reference", _wrap("5"), payload))
    for k, bomb in enumerate(BOMBS):
        cases.append((f"bomb-{k}", _wrap(bomb), "5"))
        cases.append((f"bomb-{k}-vs-x", _wrap(bomb), "x+1"))
    for k, nest in enumerate(NESTING):
        cases.append((f"nesting-{k}", _wrap(nest), "5"))
    for name, text in _big_texts() + _boxes():
        cases.append((name, text, "17"))
    for k, text in enumerate(CONTROL):
        cases.append((f"control-{k}", _wrap(text), "7"))
    for k, text in enumerate(ODD_LATEX):
        cases.append((f"odd-latex-{k}", _wrap(text), "17"))
        cases.append((f"odd-latex-{k}-raw", text, "17"))
    return cases

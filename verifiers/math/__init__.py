"""The ``math_equivalence`` verifier's machinery: extraction, parsing, comparison, and a killable worker pool.

Pipeline for one response (see :func:`grade.prepare` and :func:`grade.judge`):

1. ``text``: strip control and zero-width characters, map Unicode maths to LaTeX; cap the input size.
2. ``extract``: the last final answer (``\\boxed{}``/``\\fbox``, an ``Answer:`` line, or a clear final sentence),
   plus the checks that reject reward hacking *between* answers (hedged or many different boxes).
3. ``latex``: normalise the answer text and parse it with our own bounded recursive-descent parser into a small
   AST (``nodes``); ``structure`` reads the shape: tuple, set, interval, relation, equation, matrix, text.
4. ``compare``: structural comparison; scalars are compared exactly with fractions (``exact``) in the parent
   process. What needs sympy goes to ``symbolic``, which runs only in the worker processes of ``pool``.

Nothing here calls ``eval`` or sympy's string parsing on model text: the only parsers are ours and the ANTLR
grammar of latex2sympy2_extended (a fallback, in the workers).
"""

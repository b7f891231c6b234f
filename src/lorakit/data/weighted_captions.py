"""`--weighted_captions`: AUTOMATIC1111 prompt-weight syntax (reference §4.3).

`(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.5)` sets a factor, brackets nest and
multiply, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters (a lone backslash is
dropped), and unbalanced brackets close at the end.
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One token of the syntax: an escape, a bracket, ":weight)" closing a round bracket, plain text, or a lone ":".
SYNTAX = re.compile(
    r"""
    \\[()\[\]\\] | \\ | \( | \[ | :\s*([+-]?[.\d]+)\s*\) | \) | \] | [^\\()\[\]:]+ | :
    """,
    re.VERBOSE,
)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a caption into (text, weight) runs, neighbouring runs of equal weight merged.

    >>> parse_weights("a (house:1.3) [on] a (hill)")
    [('a ', 1.0), ('house', 1.3), (' ', 1.0), ('on', 0.9090909090909091), (' a ', 1.0), ('hill', 1.1)]
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])  # a lone backslash escapes nothing and is dropped, as in A1111
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_FACTOR)
        else:
            runs.append([token, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_FACTOR)
    for start in square_open:
        multiply_from(start, SQUARE_FACTOR)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, weight) for run_text, weight in merged] or [("", 1.0)]


def plain_text(text: str) -> str:
    """The caption without weight syntax (what the weights apply to)."""
    return "".join(run for run, _ in parse_weights(text))

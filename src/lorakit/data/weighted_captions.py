"""`--weighted_captions`: AUTOMATIC1111 prompt-weight syntax (sd-scripts'
`library/custom_train_functions.py`, `parse_prompt_attention`).

`(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.5)` sets a factor, brackets nest and
multiply, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters (a lone backslash is
dropped), and unbalanced brackets close at the end.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from transformers import CLIPTokenizer

from lorakit.models.text_encoding import sequence_length, split_chunks

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


def weighted_tokens(
    tokenizer: CLIPTokenizer, texts: Sequence[str], max_token_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions with weight syntax -> (ids [B, n, 77], weights [B, n, 77]), the ids laid out exactly as
    `text_encoding.tokenize` lays out the plain text, each weight aligned with its id (1 at BOS, EOS, padding).

    Each run is tokenised on its own (as A1111 and sd-scripts do), so a weight boundary inside a word splits it.
    """
    length = sequence_length(max_token_length)
    id_rows, weight_rows = [], []
    for text in texts:
        ids: list[int] = []
        weights: list[float] = []
        for run, weight in parse_weights(text):
            run_ids = tokenizer(run, add_special_tokens=False).input_ids
            ids += run_ids
            weights += [weight] * len(run_ids)
        ids, weights = ids[: length - 2], weights[: length - 2]
        padding = length - 2 - len(ids)
        id_rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weight_rows.append([1.0, *weights, 1.0] + [1.0] * padding)
    ids = split_chunks(torch.tensor(id_rows, dtype=torch.long), tokenizer.eos_token_id, tokenizer.pad_token_id)
    weights = torch.tensor(weight_rows, dtype=torch.float32)
    middle = weights[:, 1:-1].reshape(ids.shape[0], ids.shape[1], -1)
    ones = torch.ones(ids.shape[0], ids.shape[1], 1)
    return ids, torch.cat([ones, middle, ones], dim=2)

from __future__ import annotations

import pytest
import torch

from lorakit.data.weighted_captions import parse_weights, plain_text, weighted_tokens
from lorakit.models.text_encoding import tokenize
from lorakit.models.tokenizers import load_tokenizers

# The examples of AUTOMATIC1111's `parse_prompt_attention` docstring, the syntax's reference.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_a1111_examples(text, expected):
    assert parse_weights(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("[faded]", [("faded", 1 / 1.1)]),
        ("[[faded]]", [("faded", 1 / 1.1 / 1.1)]),
        ("(red:1.5) car", [("red", 1.5), (" car", 1.0)]),
        ("( red : 0.25 )", [(" red ", 0.25)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),  # a colon outside brackets is text
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("a \\b", [("a b", 1.0)]),  # a lone backslash escapes nothing and is dropped
        ("unopened) and ]", [("unopened) and ]", 1.0)]),
    ],
)
def test_more_syntax(text, expected):
    runs = parse_weights(text)
    assert [run for run, _ in runs] == [run for run, _ in expected]
    assert [weight for _, weight in runs] == pytest.approx([weight for _, weight in expected])


def test_plain_text_drops_only_the_syntax():
    assert plain_text("a (red:1.5) car, [blurry], \\(c\\)") == "a red car, blurry, (c)"


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizers()


LONG = ", ".join(f"tag{i} word" for i in range(60))  # well over 150 tokens


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
@pytest.mark.parametrize("text", ["a photo of a cat", "a, b; c... (done)", LONG, ""])
def test_unweighted_text_tokenises_exactly_like_plain_tokenize(tokenizers, text, max_token_length):
    for tokenizer in tokenizers:
        ids, weights = weighted_tokens(tokenizer, [plain_text(text)], max_token_length)
        assert torch.equal(ids, tokenize(tokenizer, [plain_text(text)], max_token_length))
        assert torch.equal(weights, torch.ones_like(weights))


def test_weights_sit_on_their_tokens(tokenizers):
    tokenizer = tokenizers[1]
    ids, weights = weighted_tokens(tokenizer, ["a (red:1.5) car, [old] house"], None)
    assert torch.equal(ids, tokenize(tokenizer, ["a red car, old house"], None))
    red, old = tokenizer("red", add_special_tokens=False).input_ids, tokenizer("old", add_special_tokens=False).input_ids
    expected = torch.ones(1, 1, 77)
    expected[0, 0, 2] = 1.5  # BOS, "a", "red"
    expected[0, 0, 5] = 1 / 1.1  # ..., "car", ",", "old"
    assert ids[0, 0, 2].item() == red[0] and ids[0, 0, 5].item() == old[0]
    assert torch.allclose(weights, expected)


def test_weights_follow_tokens_into_later_chunks(tokenizers):
    tokenizer = tokenizers[0]
    cat = tokenizer("cat", add_special_tokens=False).input_ids[0]
    text = "cat " * 79 + "(dog:2) " + "cat " * 10  # token 79 is "dog": chunk 1, position 1 + (79 - 75) = 5
    ids, weights = weighted_tokens(tokenizer, [text], 150)
    assert ids.shape == weights.shape == (1, 2, 77)
    assert ids[0, 1, 5].item() == tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert weights[0, 1, 5].item() == 2.0
    assert weights.sum().item() == 2 * 77 + 1.0
    assert ids[0, 1, 4].item() == cat

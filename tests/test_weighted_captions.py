from __future__ import annotations

import pytest

from lorakit.data.weighted_captions import parse_weights, plain_text

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

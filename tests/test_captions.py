from __future__ import annotations

import random

import pytest

from lorakit.data.captions import process_caption, randomising_option, split_tags, warmup_steps
from lorakit.data.config import default_caption_options as O

# Random draws under the seeds used below (Python's Mersenne Twister, the same generator sd-scripts' global
# `random` is): Random(0).random() x6 = .844 .758 .421 .259 .511 .405; Random(1).random() = .134;
# Random(0).shuffle([a, b, c, d, e]) -> [c, b, a, e, d]; Random(1).shuffle([a, b, c]) -> [b, c, a];
# Random(0).choice of 3 -> 2nd; Random(0).choice of 2 lines -> 2nd, then choice of 2 -> 2nd;
# Random(1).choice of 2 lines -> 1st; Random(3).shuffle of 6 -> [0, 2, 3, 5, 4, 1] followed by
# random() x6 = .626 .066 .013 .837 .259 .234.
CASES = [
    # (caption, options, seed, epoch, step, max_train_steps, expected)
    ("photo of sks", O(), 0, 1, 0, 0, "photo of sks"),
    ("photo of sks", O(caption_prefix="a", caption_suffix="dog"), 0, 1, 0, 0, "a photo of sks dog"),
    # caption dropout: .844 >= .5 keeps, .134 < .5 drops (prefix and suffix too)
    ("photo of sks", O(caption_dropout_rate=0.5, caption_prefix="a"), 0, 1, 0, 0, "a photo of sks"),
    ("photo of sks", O(caption_dropout_rate=0.5, caption_prefix="a"), 1, 1, 0, 0, ""),
    # every N epochs, 1-based: N=2 drops epochs 2, 4; N=1 drops every epoch
    ("photo", O(caption_dropout_every_n_epochs=2), 0, 2, 0, 0, ""),
    ("photo", O(caption_dropout_every_n_epochs=2), 0, 3, 0, 0, "photo"),
    ("photo", O(caption_dropout_every_n_epochs=1), 0, 1, 0, 0, ""),
    # multi-line captions: only the first line without wildcards; a random line with them
    ("line one\nline {a|b}", O(), 0, 1, 0, 0, "line one"),
    ("line one\nline {a|b}", O(enable_wildcard=True), 0, 1, 0, 0, "line b"),
    ("line one\nline {a|b}", O(enable_wildcard=True), 1, 1, 0, 0, "line one"),
    ("a {red|green|blue} car", O(), 0, 1, 0, 0, "a {red|green|blue} car"),
    ("a {red|green|blue} car", O(enable_wildcard=True), 0, 1, 0, 0, "a green car"),
    ("{{literal}} {x|y|z}", O(enable_wildcard=True), 0, 1, 0, 0, "{literal} y"),
    # keep_tokens: the first tags stay, the rest is shuffled
    ("sks, a, b, c, d, e", O(shuffle_caption=True, keep_tokens=1), 0, 1, 0, 0, "sks, c, b, a, e, d"),
    ("a,b,c,d,e", O(shuffle_caption=True), 0, 1, 0, 0, "c, b, a, e, d"),
    # keep_tokens_separator: fixed prefix and fixed suffix, empty tags dropped
    (
        "sks, girl ||| a, b, , c, d, e ||| masterpiece, best",
        O(shuffle_caption=True, keep_tokens_separator="|||"),
        0, 1, 0, 0,
        "sks, girl, c, b, a, e, d, masterpiece, best",
    ),
    # ... and without shuffle, warm-up or tag dropout the caption is used as is, separator included
    ("sks ||| a, b", O(keep_tokens_separator="|||"), 0, 1, 0, 0, "sks ||| a, b"),
    # tag dropout .5: keep a (.844), b (.758), drop c (.421), d (.259), keep e (.511), drop f (.405)
    ("a, b, c, d, e, f", O(caption_tag_dropout_rate=0.5), 0, 1, 0, 0, "a, b, e"),
    # shuffle first, then tag dropout from the same generator: [sks, b, c, e, d, a] with .626 .066 .013 .837
    # .259 .234 against .3 keeps sks and e
    ("sks, a, b, c, d, e", O(shuffle_caption=True, caption_tag_dropout_rate=0.3), 3, 1, 0, 0, "sks, e"),
    # a custom separator splits; the result is always joined with ", "
    ("a; b; c", O(shuffle_caption=True, caption_separator=";"), 1, 1, 0, 0, "b, c, a"),
    # token warm-up over 10 steps from 1 tag: step 4 keeps floor(4 * (5 - 1) / 10) + 1 = 2 tags
    ("a, b, c, d, e", O(token_warmup_step=10), 0, 1, 4, 100, "a, b"),
    ("a, b, c, d, e", O(token_warmup_step=10), 0, 1, 10, 100, "a, b, c, d, e"),
    ("a, b, c, d, e", O(token_warmup_step=10, token_warmup_min=3), 0, 1, 0, 100, "a, b, c"),
    # a fraction is of max_train_steps: 0.5 * 20 = 10 steps; step 5 keeps floor(5 * 4 / 10) + 1 = 3
    ("a, b, c, d, e", O(token_warmup_step=0.5), 0, 1, 5, 20, "a, b, c"),
    # the secondary separator becomes the separator after processing (so it keeps tags together)
    ("a, red;;blue, c", O(secondary_separator=";;"), 0, 1, 0, 0, "a, red,blue, c"),
    ("sks, red;;blue, c", O(shuffle_caption=True, keep_tokens=1, secondary_separator=";;"), 1, 1, 0, 0,
     "sks, c, red,blue"),
]


@pytest.mark.parametrize("caption, options, seed, epoch, step, max_steps, expected", CASES)
def test_caption_table(caption, options, seed, epoch, step, max_steps, expected):
    assert process_caption(caption, options, random.Random(seed), epoch, step, max_steps) == expected


def test_the_draw_order_matches_a_replay_of_sd_scripts():
    # sd-scripts: dropout draw, then line choice, then wildcard choices, then shuffle, then tag dropout draws.
    options = O(caption_dropout_rate=0.1, enable_wildcard=True, shuffle_caption=True, caption_tag_dropout_rate=0.2)
    caption = "x, {p|q}, y, z\nu, v, {s|t}"
    for seed in range(20):
        replay = random.Random(seed)
        if replay.random() < 0.1:
            expected = ""
        else:
            line = replay.choice(caption.split("\n"))
            for wildcard, choices in (("{p|q}", ["p", "q"]), ("{s|t}", ["s", "t"])):
                if wildcard in line:
                    line = line.replace(wildcard, replay.choice(choices))
            tags = [t.strip() for t in line.split(",")]
            replay.shuffle(tags)
            expected = ", ".join(t for t in tags if replay.random() >= 0.2)
        assert process_caption(caption, options, random.Random(seed)) == expected


def test_split_tags_in_keep_tokens_mode_keeps_empty_tags():
    assert split_tags("a,, b", O(keep_tokens=1)) == (["a"], ["", "b"], [])


def test_warmup_steps():
    assert warmup_steps(0.25, 1000) == 250
    assert warmup_steps(40, 1000) == 40
    assert warmup_steps(0, 1000) == 0


@pytest.mark.parametrize(
    "caption, options, expected",
    [
        ("a, b", O(caption_prefix="sks", secondary_separator=";"), None),
        ("a, b", O(shuffle_caption=True), "shuffle_caption"),
        ("a, b", O(caption_dropout_rate=0.1), "caption_dropout_rate"),
        ("a, b", O(caption_dropout_every_n_epochs=3), "caption_dropout_every_n_epochs"),
        ("a, b", O(caption_tag_dropout_rate=0.1), "caption_tag_dropout_rate"),
        ("a, b", O(token_warmup_step=5), "token_warmup_step"),
        ("a {x|y}", O(enable_wildcard=True), "enable_wildcard"),
        ("one\ntwo", O(enable_wildcard=True), "enable_wildcard"),
        ("a {x} {{y|z}}", O(enable_wildcard=True), None),  # one choice, and an escaped literal
        ("a {x|x}", O(enable_wildcard=True), None),
        ("a {x|y}", O(), None),  # wildcards off: the text is literal
    ],
)
def test_randomising_option(caption, options, expected):
    assert randomising_option(caption, options) == expected

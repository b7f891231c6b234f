"""Sample-prompt files in the three formats sd-scripts reads (`library/train_util.py` `load_prompts`)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from lorakit.errors import LorakitError
from lorakit.train.sample_prompts import (
    DEFAULT_SIZE,
    SamplePrompt,
    load_sample_prompts,
    parse_sample_prompts,
)

EVERY_OPTION = SamplePrompt(prompt="a cat, masterpiece", negative_prompt="blurry, low quality", width=832,
                            height=1216, steps=28, scale=5.5, seed=42, sampler="euler_a")


@pytest.mark.parametrize(("line", "expected"), [
    ("a cat", SamplePrompt("a cat")),
    ("a cat, masterpiece --n blurry, low quality --w 832 --h 1216 --d 42 --s 28 --l 5.5 --ss euler_a", EVERY_OPTION),
    # Case-insensitive letters, any order, sampler name case-insensitive too.
    ("a cat, masterpiece --SS Euler_A --L 5.5 --S 28 --D 42 --H 1216 --W 832 --N blurry, low quality", EVERY_OPTION),
    # Sizes floor to multiples of 8, at least 64; steps clamp to 1..1000.
    ("x --w 1023 --h 30", SamplePrompt("x", width=1016, height=64)),
    ("x --s 0", SamplePrompt("x", steps=1)),
    ("x --s 5000", SamplePrompt("x", steps=1000)),
    ("x --l 7", SamplePrompt("x", scale=7.0)),
    ("x --ss dpmsolver++", SamplePrompt("x", sampler="dpmsolver++")),
    ("x --ss k_dpm_2_a", SamplePrompt("x", sampler="k_dpm_2_a")),
    # The prompt itself may contain dashes that are not " --".
    ("sci-fi city, a--b --d 3", SamplePrompt("sci-fi city, a--b", seed=3)),
])
def test_txt_lines(line: str, expected: SamplePrompt) -> None:
    assert parse_sample_prompts(line, ".txt") == [expected]


def test_txt_skips_blank_and_comment_lines_and_keeps_order() -> None:
    text = "# header\n\nfirst --d 1\n   # indented comment\nsecond --d 2\n\n"
    assert [(p.prompt, p.seed) for p in parse_sample_prompts(text, ".txt")] == [("first", 1), ("second", 2)]


def test_default_sampler_and_size() -> None:
    (prompt,) = parse_sample_prompts("x", ".txt", default_sampler="k_euler")
    assert prompt.sampler == "k_euler"
    # SDXL's own size, not sd-scripts' 512.
    assert (prompt.width, prompt.height, prompt.steps, prompt.scale, prompt.seed) == (1024, 1024, 30, 7.5, None)
    assert DEFAULT_SIZE == 1024


@pytest.mark.parametrize(("line", "message"), [
    ("x --w wide --h 512", "--w is 'wide'; expected"),
    ("x --d -5", "--d is '-5'; expected"),
    ("x --l much", "--l is 'much'; expected"),
    ("x --ss turbo --d 1", "--ss is 'turbo'; expected"),
])
def test_bad_option_value_is_one_error_line(line, message) -> None:
    with pytest.raises(LorakitError, match=re.escape(message)) as error:
        parse_sample_prompts(line, ".txt")
    assert f"line {line!r}" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("line", "expected", "message"), [
    ("x --q 3 --d 1", SamplePrompt("x", seed=1), "unknown option --q"),
    ("x --g 3.5", SamplePrompt("x"), "--g has no effect on SDXL"),
])
def test_unknown_or_other_model_option_warns_once_and_is_skipped(line, expected, message, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lorakit.train.sample_prompts"):
        assert parse_sample_prompts(line, ".txt") == [expected]
    assert len(caplog.records) == 1
    assert message in caplog.records[0].getMessage()


TOML = """
[prompt]
negative_prompt = "blurry, low quality"
width = 832
height = 1216
sample_steps = 28
scale = 5.5
sample_sampler = "euler_a"

[[prompt.subset]]
prompt = "a cat, masterpiece"
seed = 42

[[prompt.subset]]
prompt = "a dog"
width = 1024
sample_steps = 4000
sample_sampler = "DDIM"
"""


def test_toml_defaults_and_subsets() -> None:
    first, second = parse_sample_prompts(TOML, ".toml")
    assert first == EVERY_OPTION
    # A subset overrides the defaults (sd-scripts raises a TypeError here).
    assert second == SamplePrompt("a dog", "blurry, low quality", 1024, 1216, 1000, 5.5, None, "ddim")


def test_json_strings_and_tables() -> None:
    data = [
        "a cat, masterpiece --n blurry, low quality --w 832 --h 1216 --d 42 --s 28 --l 5.5 --ss euler_a",
        {"prompt": "a cat, masterpiece", "negative_prompt": "blurry, low quality", "width": 832, "height": 1216,
         "sample_steps": 28, "scale": 5.5, "seed": 42, "sample_sampler": "euler_a"},
        {"prompt": "plain"},
    ]
    assert parse_sample_prompts(json.dumps(data), ".json") == [EVERY_OPTION, EVERY_OPTION, SamplePrompt("plain")]


@pytest.mark.parametrize("suffix", [".txt", ".toml", ".json"])
def test_load_from_file(tmp_path, suffix) -> None:
    text = {".txt": "# c\n" + "a cat, masterpiece --n blurry, low quality --w 832 --h 1216 --d 42 --s 28 --l 5.5 "
                             "--ss euler_a\n",
            ".toml": TOML,
            ".json": json.dumps([{"prompt": "a cat, masterpiece", "negative_prompt": "blurry, low quality",
                                  "width": 832, "height": 1216, "sample_steps": 28, "scale": 5.5, "seed": 42,
                                  "sample_sampler": "euler_a"}])}[suffix]
    path = tmp_path / f"prompts{suffix.upper()}"  # extension case does not matter
    path.write_text(text, encoding="utf-8")
    assert load_sample_prompts(path)[0] == EVERY_OPTION


def test_table_bad_value_is_an_error_and_unknown_keys_warn(caplog) -> None:
    with pytest.raises(LorakitError, match="item 0: 'width' is 'wide'; expected"):
        parse_sample_prompts(json.dumps([{"prompt": "x", "width": "wide"}]), ".json")
    with pytest.raises(LorakitError, match="item 0: 'seed' is True; expected"):
        parse_sample_prompts(json.dumps([{"prompt": "x", "seed": True}]), ".json")
    data = [{"prompt": "x", "cfg": 3, "controlnet_image": "a.png"}]
    with caplog.at_level(logging.WARNING, logger="lorakit.train.sample_prompts"):
        assert parse_sample_prompts(json.dumps(data), ".json") == [SamplePrompt("x")]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and any("unknown key 'cfg'" in m for m in messages)


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("[prompt]\nwidth = 5\n", ".toml", "[[prompt.subset]]"),
    ("[prompt\n", ".toml", "invalid TOML"),
    ('{"prompt": "x"}', ".json", "expected a JSON list"),
    ("[3]", ".json", "item 0 is a int"),
    ('[{"width": 512}]', ".json", "no prompt text"),
    ("x", ".yaml", "extension '.yaml'"),
])
def test_broken_files_raise(text, suffix, message) -> None:
    with pytest.raises(LorakitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_sample_prompts(text, suffix)


def test_missing_file_and_bad_default_sampler(tmp_path) -> None:
    with pytest.raises(LorakitError, match="none.txt: no such file"):
        load_sample_prompts(tmp_path / "none.txt")
    with pytest.raises(LorakitError, match="--sample_sampler is 'fast'"):
        parse_sample_prompts("x", ".txt", default_sampler="fast")

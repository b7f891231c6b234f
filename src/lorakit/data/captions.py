"""Caption processing, in sd-scripts' order (`library/train_util.py`, `BaseDataset.process_caption`), as pure
functions of the caption, the subset's caption options, a seeded `random.Random` and the training position (epoch,
step).

Every random draw comes from the `rng` argument in the same order as sd-scripts draws from its global
`random`, so with the same seed both pick the same dropouts, lines, wildcard choices and shuffles.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's caption settings; field names are the dataset TOML keys (defaults: `data.config.DEFAULTS`)."""

    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    enable_wildcard: bool
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float
    secondary_separator: str | None


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> int:
    """Token warm-up length in steps: a value below 1 is a fraction of the whole training."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return int(token_warmup_step)


def add_prefix_suffix(caption: str, options: CaptionOptions) -> str:
    """Step 1: prefix and suffix, each joined with one space."""
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    return caption


def is_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Step 2: drop the whole caption (random rate, or every N-th 1-based epoch). Draws only when rate > 0."""
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every = options.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Step 3 with `enable_wildcard`: one line of a multi-line caption, then each `{a|b|c}` replaced by one
    choice; `{{` and `}}` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\x00", "\x01"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix tags, flexible tags, fixed suffix tags) of a caption.

    With `keep_tokens_separator` present, text before its first occurrence is fixed, text after a second
    occurrence is a fixed suffix, and empty tags are dropped; otherwise the first `keep_tokens` tags are fixed.
    """
    separator = options.caption_separator
    marker = options.keep_tokens_separator
    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        suffix: list[str] = []
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
            suffix = _nonempty_tags(suffix_part, separator)
        return _nonempty_tags(fixed_part, separator), _nonempty_tags(flex_part, separator), suffix
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    keep = options.keep_tokens if options.keep_tokens > 0 else 0
    return tags[:keep], tags[keep:], []


def _nonempty_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def rearrange_tags(
    caption: str, options: CaptionOptions, rng: random.Random, step: int, max_train_steps: int
) -> str:
    """Step 4: token warm-up, shuffle of the flexible tags, tag dropout; re-joined with ", "."""
    fixed, flexible, fixed_suffix = split_tags(caption, options)
    warmup = warmup_steps(options.token_warmup_step, max_train_steps)
    if warmup and step < warmup:
        count = math.floor(step * ((len(flexible) - options.token_warmup_min) / warmup)) + options.token_warmup_min
        flexible = flexible[:count]
    if options.shuffle_caption:
        rng.shuffle(flexible)
    if options.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def rearranges_tags(options: CaptionOptions) -> bool:
    """Whether step 4 runs at all; when it does not, the caption (even a keep_tokens_separator) stays as is."""
    return options.shuffle_caption or options.token_warmup_step > 0 or options.caption_tag_dropout_rate > 0


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption a sample trains with this time it is drawn (`epoch` is 1-based, `step` the global step)."""
    caption = add_prefix_suffix(caption, options)
    if is_dropped(options, rng, epoch):
        return ""
    if options.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    if rearranges_tags(options):
        caption = rearrange_tags(caption, options, rng, step, max_train_steps)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def randomising_option(caption: str, options: CaptionOptions) -> str | None:
    """The name of the first option that would make this caption differ between draws, or None when the
    processed caption is always the same (so its text-encoder outputs can be cached)."""
    for name, active in (
        ("shuffle_caption", options.shuffle_caption),
        ("caption_dropout_rate", options.caption_dropout_rate > 0),
        ("caption_dropout_every_n_epochs", options.caption_dropout_every_n_epochs > 0),
        ("caption_tag_dropout_rate", options.caption_tag_dropout_rate > 0),
        ("token_warmup_step", options.token_warmup_step > 0),
    ):
        if active:
            return name
    if options.enable_wildcard and _has_choices(add_prefix_suffix(caption, options)):
        return "enable_wildcard"
    return None


def _has_choices(caption: str) -> bool:
    if len(set(caption.split("\n"))) > 1:
        return True
    escaped = caption.replace("{{", "\x00").replace("}}", "\x01")
    return any(len(set(match.group(1).split("|"))) > 1 for match in WILDCARD.finditer(escaped))

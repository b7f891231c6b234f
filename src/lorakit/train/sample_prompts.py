"""Sample-prompt files (`--sample_prompts`; sd-scripts' `library/train_util.py`,
`load_prompts` and `line_to_prompt_dict`): `.txt`, `.toml` or `.json` -> a list of SamplePrompt.

- `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped. Options follow the prompt,
  each introduced by " --" (the line is split on that literal): `--w` width, `--h` height, `--d` seed, `--s` steps,
  `--l` CFG scale, `--n` negative prompt, `--ss` sampler. Option letters are case-insensitive.
- `.toml`: a `[prompt]` table of defaults and `[[prompt.subset]]` entries; each entry is the defaults updated by
  its own keys (sd-scripts cannot override a default in a subset: it builds `dict(**defaults, **subset)`).
- `.json`: a list whose items are option strings (read like a `.txt` line) or tables.
  Table keys: prompt, negative_prompt, width, height, sample_steps, scale, seed, sample_sampler.

A bad option (unknown, unparsable, or meant for another model) is one warning and is skipped; a broken file
or an entry without a prompt is a LorakitError.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorakit.config.flags import MAX_SIDE
from lorakit.errors import LorakitError
from lorakit.fileio import parse_json, parse_toml, read_text


log = logging.getLogger(__name__)

SAMPLER_NAMES = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "ddpm")
DEFAULT_STEPS = 30
# SDXL's native size. sd-scripts defaults to 512x512 even for SDXL, where the model produces poor images.
DEFAULT_SIZE = 1024
DEFAULT_SCALE = 7.5
MIN_SIZE = 64
MAX_STEPS = 1000

# Option letters of a .txt line -> SamplePrompt field.
TEXT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "steps", "l": "scale", "n": "negative_prompt",
                "ss": "sampler"}
# Keys of a .toml / .json table -> SamplePrompt field.
TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "sample_steps": "steps", "scale": "scale", "seed": "seed", "sample_sampler": "sampler"}
# Options sd-scripts reads for other model families; they do nothing for SDXL.
OTHER_MODELS = {"g", "cn", "ctr", "rcfg", "fs", "guidance_scale", "controlnet_image"}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to generate. `seed=None`: a fresh random seed each time (recorded in the file name)."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sampler: str = "ddim"


def load_sample_prompts(path: str | Path, default_sampler: str = "ddim") -> list[SamplePrompt]:
    """Read a prompt file; the format follows the extension (.txt, .toml, .json)."""
    path = Path(path)
    text = read_text(path, "--sample_prompts")
    return parse_sample_prompts(text, path.suffix.lower(), default_sampler, source=str(path))


def parse_sample_prompts(text: str, suffix: str, default_sampler: str = "ddim",
                         source: str = "--sample_prompts") -> list[SamplePrompt]:
    """The prompts of a file's `text`; `suffix` (".txt", ".toml", ".json") selects the format."""
    if default_sampler.lower() not in SAMPLER_NAMES:
        raise LorakitError(f"--sample_sampler is {default_sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    base = SamplePrompt(prompt="", sampler=default_sampler.lower())
    if suffix == ".txt":
        lines = (line.strip() for line in text.splitlines())
        return [_from_line(line, base, f"{source}: line {line!r}") for line in lines
                if line and not line.startswith("#")]
    if suffix == ".toml":
        return _from_toml(text, base, source)
    if suffix == ".json":
        return _from_json(text, base, source)
    raise LorakitError(f"--sample_prompts {source}: extension {suffix!r} is not supported; expected .txt, .toml "
                       "or .json")


def _from_line(line: str, base: SamplePrompt, where: str) -> SamplePrompt:
    prompt, *options = line.split(" --")
    fields: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        letter, _, value = option.strip().partition(" ")
        letter = letter.lower()
        if letter in OTHER_MODELS:
            log.warning("%s: option --%s has no effect on SDXL samples; ignored", where, letter)
        elif letter not in TEXT_OPTIONS:
            log.warning("%s: unknown option --%s ignored (known: %s)", where, letter,
                        ", ".join("--" + o for o in TEXT_OPTIONS))
        else:
            _set(fields, TEXT_OPTIONS[letter], value.strip(), where, f"--{letter}")
    return _build(base, fields, where)


def _from_table(table: Mapping[str, Any], base: SamplePrompt, where: str) -> SamplePrompt:
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key in OTHER_MODELS:
            log.warning("%s: key %r has no effect on SDXL samples; ignored", where, key)
        elif key not in TABLE_KEYS:
            log.warning("%s: unknown key %r ignored (known: %s)", where, key, ", ".join(TABLE_KEYS))
        else:
            _set(fields, TABLE_KEYS[key], value, where, repr(key))
    return _build(base, fields, where)


def _from_toml(text: str, base: SamplePrompt, source: str) -> list[SamplePrompt]:
    data = parse_toml(text, source, "--sample_prompts")
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise LorakitError(f"--sample_prompts {source}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    return [_from_table({**defaults, **subset}, base, f"{source}: [[prompt.subset]] {i + 1}")
            for i, subset in enumerate(subsets)]


def _from_json(text: str, base: SamplePrompt, source: str) -> list[SamplePrompt]:
    data = parse_json(text, source, "--sample_prompts")
    if not isinstance(data, list):
        raise LorakitError(f"--sample_prompts {source}: expected a JSON list of prompts, found {type(data).__name__}")
    prompts = []
    for i, item in enumerate(data):
        where = f"{source}: item {i}"
        if isinstance(item, str):
            prompts.append(_from_line(item.strip(), base, where))
        elif isinstance(item, dict):
            prompts.append(_from_table(item, base, where))
        else:
            raise LorakitError(f"{where} is a {type(item).__name__}; expected a prompt string or an object")
    return prompts


def _set(fields: dict[str, Any], field: str, value: Any, where: str, name: str) -> None:
    """Convert `value` for `field` into `fields`; an unusable value is bad input (sd-scripts skips it, and the
    samples then silently differ from what the file says)."""
    convert, expected = _CONVERTERS[field]
    try:
        fields[field] = convert(value)
    except (TypeError, ValueError):
        raise LorakitError(f"{where}: {name} is {value!r}; expected {expected}") from None


def _build(base: SamplePrompt, fields: dict[str, Any], where: str) -> SamplePrompt:
    if not fields.get("prompt"):
        raise LorakitError(f"{where}: no prompt text; expected a prompt (a line's text or a 'prompt' key)")
    return replace(base, **fields)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise TypeError(value)
    return int(value)


def _seed(value: Any) -> int:
    number = _integer(value)
    if not 0 <= number < 2**63:  # what a torch.Generator takes
        raise ValueError(value)
    return number


def _size(value: Any) -> int:
    """Floored to a multiple of 8 (the VAE's factor), at least 64 (as sd-scripts); at most the largest side."""
    number = _integer(value)
    if not 1 <= number <= MAX_SIDE:
        raise ValueError(value)
    return max(MIN_SIZE, number - number % 8)


def _steps(value: Any) -> int:
    return min(MAX_STEPS, max(1, _integer(value)))


def _scale(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value.strip()


def _sampler(value: Any) -> str:
    name = _text(value).lower()
    if name not in SAMPLER_NAMES:
        raise ValueError(value)
    return name


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "prompt": (_text, "a string"),
    "negative_prompt": (_text, "a string"),
    "width": (_size, f"an integer from 1 to {MAX_SIDE}"),
    "height": (_size, f"an integer from 1 to {MAX_SIDE}"),
    "steps": (_steps, "an integer"),
    "scale": (_scale, "a finite number"),
    "seed": (_seed, "an integer from 0 to below 2**63"),
    "sampler": (_sampler, "one of " + ", ".join(SAMPLER_NAMES)),
}

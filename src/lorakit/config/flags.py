"""What a command-line flag is, and the converters that turn one word of text into a typed value.

The table itself is `TrainConfig` (train_config.py): each field is declared with `GROUP.flag(...)` or
`GROUP.switch(...)`, which records a `Flag` in the field's metadata. The parser, `--help`, docs/flags.md,
`--config_file` conversion and the metadata strings are all generated from those records.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

FLAG_KEY = "lorakit.flag"
MAX_SIDE = 8192  # pixels: the largest resolution or bucket side accepted (SDXL trains at 1024)


@dataclass(frozen=True)
class Bounds:
    """The values a numeric flag accepts: from `low` to `high` (None: unbounded), each end included unless
    `low_open` / `high_open`. `name` says it in words ("a probability from 0 to 1")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    name: str | None = None

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.name:
            return self.name
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {self.low:g}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return "a value " + " and ".join(part for part in (low, high) if part)


@dataclass(frozen=True)
class Flag:
    """One option `--<name>`: how to read it, what it means, and whether lorakit implements it."""

    name: str
    group: Group
    help: str
    default: Any
    parse: Callable[[str], Any] | None  # converter of one word; None for a switch (store_true)
    choices: tuple[Any, ...] | None = None
    many: bool = False  # nargs="*": the value is a tuple of converted words
    metavar: str | None = None
    kohya: bool = True  # False: a lorakit addition, absent from sd-scripts' parser
    refused: str | None = None  # reason why a non-default value is refused; None = implemented
    secret: bool = False  # never written to --output_config files or metadata
    to_file: Callable[[Any], Any] | None = None  # typed value -> the TOML value both tools read back
    bounds: Bounds | None = None  # the accepted range of a numeric flag (each value of a list flag)
    # Model families that treat the flag otherwise than `refused` says: family -> its reason, or None when the
    # family implements it (`refused` is then the other families' reason).
    families: Mapping[str, str | None] | None = None

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def is_switch(self) -> bool:
        return self.parse is None

    @property
    def implemented(self) -> bool:
        """Implemented by the default family's trainer (SDXL, sdxl_train_network.py)."""
        return self.refused is None

    def refused_for(self, family: str) -> str | None:
        """Why `family`'s trainer refuses a non-default value, or None when it implements the flag."""
        return self.families.get(family, self.refused) if self.families else self.refused

    def refusal(self, family: str = "sdxl") -> str:
        """The one-line error for a non-default value under `family`'s trainer."""
        if self.families:  # a flag of some families only: refused for the others for good, not "yet"
            return f"{self.option} does not apply to --model_family {family} ({self.refused_for(family)})"
        return f"not supported yet: {self.option} ({self.refused_for(family)})"

    def refusal_status(self, family: str = "sdxl") -> str:
        """How --help and the docs mark a flag that `family`'s trainer refuses."""
        if self.families:
            return f"not for --model_family {family}: {self.refused_for(family)}"
        return f"not supported yet: {self.refused_for(family)}"

    def value_name(self) -> str:
        """How the value is written in help and docs: N, X, PATH, {a,b}, ..."""
        if self.is_switch:
            return ""
        if self.choices:
            return "{" + ",".join(str(choice) for choice in self.choices) + "}"
        return f"[{self.metavar_name} ...]" if self.many else self.metavar_name

    @property
    def metavar_name(self) -> str:
        """The name of one word of the value: N, X, PATH, ... (argparse's metavar)."""
        return self.metavar or _METAVARS.get(self.parse, "TEXT")

    def file_value(self, value: Any) -> Any:
        """`value` as written into a `--config_file` TOML (lists for tuples, "W,H" for pairs)."""
        if self.to_file is not None:
            return self.to_file(value)
        return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Group:
    """A section of `--help` and of docs/flags.md; `flag` and `switch` declare the TrainConfig fields in it."""

    title: str
    description: str

    def flag(self, default: Any, parse: Callable[[str], Any], help: str, *, choices: tuple[Any, ...] | None = None,
             many: bool = False, metavar: str | None = None, kohya: bool = True, refused: str | None = None,
             secret: bool = False, to_file: Callable[[Any], Any] | None = None, bounds: Bounds | None = None,
             families: Mapping[str, str | None] | None = None) -> Any:
        flag = Flag("", self, help, default, parse, choices, many, metavar, kohya, refused, secret, to_file, bounds,
                    families)
        return dataclasses.field(default=default, repr=not secret, metadata={FLAG_KEY: flag})

    def switch(self, help: str, *, kohya: bool = True, refused: str | None = None,
               families: Mapping[str, str | None] | None = None) -> Any:
        flag = Flag("", self, help, False, None, kohya=kohya, refused=refused, families=families)
        return dataclasses.field(default=False, metadata={FLAG_KEY: flag})


def flags_of(cls: type) -> Iterator[Flag]:
    """The flags declared by a dataclass's fields, in declaration order, each named after its field."""
    for field in dataclasses.fields(cls):
        yield dataclasses.replace(field.metadata[FLAG_KEY], name=field.name)


# Converters: each takes one word from the command line (or a TOML value as text) and raises
# argparse.ArgumentTypeError with the expectation spelled out.

def number(text: str) -> float:
    """A finite float: NaN and infinities are refused here, before they reach a learning rate or a loss."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


def resolution(text: str) -> tuple[int, int]:
    """`"1024"` -> (1024, 1024); `"1024,768"` -> (1024, 768) as (width, height)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected SIZE or WIDTH,HEIGHT in pixels, found {text!r}")
    if max(sizes) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"expected sides of at most {MAX_SIDE} pixels, found {text!r}")
    return (sizes[0], sizes[-1])


def float_range(text: str) -> tuple[float, float]:
    """`"2.0,4.0"` -> (2.0, 4.0), lower bound first."""
    try:
        low, high = (number(part) for part in str(text).split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, found {text!r}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with MIN <= MAX, found {text!r}")
    return (low, high)


def steps_or_ratio(text: str) -> int | float:
    """Warm-up/decay length: an integer step count, a ratio below 1 of the total steps, or `N%`."""
    text = str(text).strip()
    expected = f"expected an integer step count, a ratio below 1 or N%, found {text!r}"
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not math.isfinite(value) or value < 0 or (text.endswith("%") and value > 1):
        raise argparse.ArgumentTypeError(expected)
    if text.endswith("%") or value < 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(expected)
    return int(value)


def pair_text(value: tuple[Any, Any]) -> str:
    """(1024, 768) -> "1024,768": the form sd-scripts reads from a TOML as well."""
    return ",".join(str(part) for part in value)


_METAVARS: dict[Any, str] = {int: "N", number: "X", str: "TEXT", resolution: "SIZE|W,H", float_range: "MIN,MAX",
                             steps_or_ratio: "N|RATIO|N%"}


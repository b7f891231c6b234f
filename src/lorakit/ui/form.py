"""The run form, generated from the flag table (`lorakit.config`): its fields, and the conversions between a
submitted form, a command line, a `--config_file` TOML and an imported sd-scripts command.

A form holds text as typed; an empty field is a flag left at its default (shown as the field's placeholder). The
command line the form makes is checked by `parse_train_args`, the code `lorakit train` runs, so the page and the
command line accept and refuse exactly the same values.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from lorakit.config import Flag, iter_flags, parse_train_args, read_config_file
from lorakit.config.parse import NOT_IN_FILES, command_line_values, help_text
from lorakit.config.train_config import GROUPS
from lorakit.errors import LorakitError, one_line
from lorakit.train.interrupt import without_flags

PROG = "sdxl_train_network.py"
# The settings of the README's training command, shown first; the rest is folded by group.
SEED_FLAGS = (
    "pretrained_model_name_or_path", "dataset_config", "output_dir", "output_name", "save_model_as",
    "network_module", "network_dim", "network_alpha", "learning_rate", "unet_lr", "text_encoder_lr1",
    "text_encoder_lr2", "optimizer_type", "lr_scheduler", "max_train_epochs", "save_every_n_epochs",
    "mixed_precision", "gradient_checkpointing", "cache_text_encoder_outputs", "cache_latents",
)
# Set by the UI itself, or meaningless for a queued run.
NOT_IN_FORM = ("config_file", "output_config", "events_log", "dry_run")
SWITCH_ON = ("on", "true", "1")


@dataclass(frozen=True)
class Field:
    """One input of the form."""

    flag: Flag

    @property
    def name(self) -> str:
        return self.flag.name

    @property
    def kind(self) -> str:
        """switch (checkbox), choice (select), words (several values), or text."""
        if self.flag.is_switch:
            return "switch"
        if self.flag.choices and not self.flag.many:
            return "choice"
        return "words" if self.flag.many else "text"

    @property
    def help(self) -> str:
        return help_text(self.flag)

    @property
    def placeholder(self) -> str:
        default = self.flag.default
        if default is None or default is False or default == () or self.kind == "switch":
            return ""
        return display_text(self.flag, default)


@dataclass(frozen=True)
class Section:
    title: str
    description: str
    fields: tuple[Field, ...]


def sections() -> list[Section]:
    """The seed command's fields first, then every group of `--help` with the rest of its flags."""
    flags = {flag.name: flag for flag in iter_flags() if flag.name not in NOT_IN_FORM}
    result = [Section("seed command", "the settings of the usual SDXL LoRA command",
                      tuple(Field(flags[name]) for name in SEED_FLAGS))]
    for group in GROUPS:
        fields = tuple(Field(flag) for flag in flags.values() if flag.group is group and flag.name not in SEED_FLAGS)
        if fields:
            result.append(Section(group.title, group.description, fields))
    return result


def display_text(flag: Flag, value: Any) -> str:
    """A typed value as the form shows it (the words of the command line)."""
    if flag.is_switch:
        return "on" if value else ""
    written = flag.file_value(value)
    if flag.many:
        return shlex.join(str(item) for item in written)
    return str(written)


def argv_of_form(form: Mapping[str, str]) -> list[str]:
    """The command line of a submitted form: only the fields that were filled in, in the table's order."""
    argv: list[str] = []
    for flag in iter_flags():
        if flag.name in NOT_IN_FORM:
            continue
        raw = (form.get(flag.name) or "").strip()
        if flag.is_switch:
            if raw.lower() in SWITCH_ON:
                argv.append(flag.option)
        elif raw and flag.many:
            try:
                argv += [flag.option, *shlex.split(raw)]
            except ValueError as error:
                raise LorakitError(f"{flag.option}: {raw!r}: {error}") from None
        elif raw:
            argv.append(f"{flag.option}={raw}")
    return argv


def form_of_values(values: Mapping[str, Any]) -> dict[str, str]:
    """Typed flag values (from a command line or a TOML) as the form's text."""
    flags = {flag.name: flag for flag in iter_flags()}
    return {name: display_text(flags[name], value) for name, value in values.items()
            if name in flags and name not in NOT_IN_FORM and value is not None}


def check(argv: list[str]) -> list[str]:
    """Raise the one-line LorakitError `lorakit train` would for this command line; else its warnings."""
    collect = WarningLines()
    logger = logging.getLogger("lorakit")
    logger.addHandler(collect)
    try:
        parse_train_args(argv, prog=PROG)
    finally:
        logger.removeHandler(collect)
    return collect.lines


class WarningLines(logging.Handler):
    """Collects the warning lines lorakit logs (for the page, instead of the server's console)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(one_line(record.getMessage()))


def toml_of(argv: list[str]) -> str:
    """The command line as a `--config_file` TOML (what sd-scripts reads too); secrets stay out of it."""
    flags = {flag.name: flag for flag in iter_flags()}
    values = command_line_values(argv, PROG)
    document = {name: flags[name].file_value(value) for name, value in values.items()
                if name not in NOT_IN_FILES and not flags[name].secret}
    return tomli_w.dumps(document)


# How a run gets each secret flag instead: the variable its library reads (wandb; the Hub flags are refused).
SECRET_ENVIRONMENT = {"wandb_api_key": "WANDB_API_KEY", "huggingface_token": "HF_TOKEN"}


def secret_environment(argv: list[str]) -> dict[str, str]:
    """The secret flags of a command line as environment variables (never in a file the app writes or shows,
    nor on the process's command line)."""
    values = command_line_values(argv, PROG)
    return {SECRET_ENVIRONMENT[name]: str(value) for name, value in values.items() if name in SECRET_ENVIRONMENT}


def without_secrets(argv: list[str]) -> list[str]:
    """`argv` with every secret flag left out."""
    return without_flags(argv, set(SECRET_ENVIRONMENT))


def command_of(argv: list[str]) -> str:
    """The command as sd-scripts users type it, secrets shown as ***."""
    shown = without_secrets(argv) + [f"--{name}=***" for name in command_line_values(argv, PROG)
                                     if name in SECRET_ENVIRONMENT]
    return shlex.join([PROG, *shown])


def import_command(text: str, root: Path) -> dict[str, Any]:
    """The flag values of a pasted command line (`accelerate launch ... sdxl_train_network.py --flag ...`,
    `lorakit train ...`, or just the flags); a `--config_file` in it is read too, the command line winning."""
    try:
        words = shlex.split(text.replace("\\\n", " "))
    except ValueError as error:
        raise LorakitError(f"the command cannot be read: {error}") from None
    script = next((i for i, word in enumerate(words) if word.endswith("train_network.py")
                   or (word == "train" and i and words[i - 1].endswith("lorakit"))), None)
    if script is not None:
        words = words[script + 1:]
    else:
        words = words[next((i for i, word in enumerate(words) if word.startswith("--")), len(words)):]
    values = command_line_values(words, PROG)
    config_file = values.pop("config_file", None)
    values.pop("output_config", None)
    if config_file:
        values = read_config_file(root / config_file) | values
    return values


def import_toml(text: str) -> dict[str, Any]:
    """The flag values of a pasted `--config_file` TOML."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_text(text, encoding="utf-8")
        try:
            return read_config_file(path)
        except LorakitError as error:
            raise LorakitError(str(error).replace(str(path), "the TOML")) from None

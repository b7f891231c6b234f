"""`python -m lorakit.config.docs [PATH]`: write docs/flags.md from the flag table (a test checks it is current)."""

from __future__ import annotations

import sys
from pathlib import Path

from lorakit.config.flags import Flag
from lorakit.config.train_config import GROUPS, iter_flags
from lorakit.fileio import atomic_path

DEFAULT_PATH = Path("docs/flags.md")

HEADER = """\
# Training flags

Generated from the flag table (`src/lorakit/config/train_config.py`) by `python -m lorakit.config.docs`;
do not edit by hand.

`sdxl_train_network.py`, `lorakit train` and `python -m lorakit train` take the command line of sd-scripts'
`sdxl_train_network.py`: all {kohya} of its flags are here, plus {extra} lorakit additions (marked
*lorakit*). A flag is either implemented or refused: giving a refused flag a non-default value stops with
`not supported yet: --flag (reason)`. Unique prefixes of long flags work (`--enable_b` for `--enable_bucket`).

`--config_file args.toml` reads the same flags as TOML keys (tables are flattened, their names ignored).
Precedence: command line > config file > defaults. File values go through the same types and choices as the
command line (`resolution = 1024`, `lr_warmup_steps = 0.1` and `lr_warmup_steps = "10%"` all work); an
unknown key is a warning naming it. Numbers are finite (`nan` and `inf` are refused) and within the range in the
*accepts* column. A switch set to `true` in the file cannot be turned off on the command
line: set it to `false` in the file. `--output_config --config_file args.toml` writes the given non-default
flags (never `--wandb_api_key` or `--huggingface_token`) to `args.toml` and exits; it never overwrites.
"""


def render_markdown() -> str:
    flags = list(iter_flags())
    parts = [HEADER.format(kohya=sum(flag.kohya for flag in flags), extra=sum(not flag.kohya for flag in flags))]
    for group in GROUPS:
        parts.append(f"\n## {group.title}\n\n{group.description[0].upper()}{group.description[1:]}.\n\n"
                     "| flag | value | default | accepts | meaning |\n|---|---|---|---|---|\n")
        parts.extend(_row(flag) for flag in flags if flag.group == group)
    return "".join(parts)


def _row(flag: Flag) -> str:
    default = "" if flag.default is None or flag.is_switch else f"`{flag.default}`" if flag.default != "" else '`""`'
    meaning = flag.help + ("" if flag.kohya else " *(lorakit)*")
    if flag.refused:
        status, reason = flag.refusal_status().split(": ", 1)
        meaning = f"**{status}**: {reason}. {meaning}"
    value = f"`{flag.value_name()}`" if flag.value_name() else "switch"
    accepts = str(flag.bounds) if flag.bounds else ""
    cells = (f"`{flag.option}`", value, default, accepts, meaning)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEFAULT_PATH
    with atomic_path(path) as temporary:
        temporary.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

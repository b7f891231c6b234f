"""`lorakit` command: subcommands dispatch to small modules; bad input becomes one line and exit code 2, anything
unexpected one line and a report file (`lorakit.errors.guarded`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.console import quiet_libraries
from lorakit.errors import guarded

# name: (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`, or parses its
# own arguments in `main(argv, prog) -> int`. Modules are imported only for the command that runs.
SUBCOMMANDS = {
    "train": ("lorakit.train.cli", "train a LoRA with sdxl_train_network.py's flags (lorakit train --help)"),
    "demo": ("lorakit.train.demo", "train a LoRA on a tiny random SDXL model and synthetic images (about a minute)"),
    "random-model": ("lorakit.testing.cli", "write a random-weight SDXL-architecture model (tiny or full)"),
    "inspect": ("lorakit.network.inspect", "summarise a LoRA file (modules, ranks, alphas, metadata) or a checkpoint"),
    "ui": ("lorakit.ui.cli", "a local web app to prepare, queue, watch, stop and resume runs (the ui extra)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="lorakit", description="Train SDXL LoRA adapters.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND",
                        help="; ".join(f"{name}: {text}" for name, (_, text) in SUBCOMMANDS.items()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    top = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module_name, help_text = SUBCOMMANDS[top.command]
    prog = f"lorakit {top.command}"
    module = importlib.import_module(module_name)
    if hasattr(module, "main"):
        return module.main(argv[1:], prog=prog)
    sub = argparse.ArgumentParser(prog=prog, description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return guarded("lorakit", argv, lambda: module.run(args))

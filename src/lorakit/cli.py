"""`lorakit` command: subcommands dispatch to small modules; bad input becomes one line and exit code 2."""

from __future__ import annotations

import argparse
import sys

from lorakit.errors import LorakitError

SUBCOMMANDS = {
    # name: (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
    "random-model": ("lorakit.testing.cli", "write a random-weight SDXL-architecture model (tiny or full)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lorakit", description="Train SDXL LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        import importlib

        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except LorakitError as error:
        print(f"lorakit: error: {error}", file=sys.stderr)
        return 2

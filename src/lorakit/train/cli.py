"""`lorakit train` / `sdxl_train_network.py` / `python -m lorakit train`: parse the flag table, set up console
logging, train; bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys

from lorakit.errors import LorakitError


def configure_logging(level: str | None, file: str | None, simple: bool) -> None:
    """--console_log_level / --console_log_file / --console_log_simple for lorakit's (and the libraries') logs."""
    handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    layout = "%(message)s" if simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(layout, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lorakit").setLevel(level or "INFO")


def main(argv: list[str] | None = None, prog: str = "lorakit train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging("INFO", None, True)  # until the flags are parsed, so their warnings show
    try:
        from lorakit.config import parse_train_args

        config = parse_train_args(argv, prog=prog)
        configure_logging(config.console_log_level, config.console_log_file, config.console_log_simple)
        from lorakit.train.trainer import train

        train(config)
    except LorakitError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0

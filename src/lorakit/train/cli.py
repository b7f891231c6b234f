"""`lorakit train` / `sdxl_train_network.py` / `train_network.py` / `python -m lorakit train`: parse the flag
table, set up console logging, train; bad input is one line on stderr and exit code 2 (`lorakit.errors.guarded`)."""

from __future__ import annotations

import sys

from lorakit.console import configure_logging
from lorakit.errors import LorakitError, describe_unexpected, guarded, one_line


def main(argv: list[str] | None = None, prog: str = "lorakit train", family: str = "sdxl") -> int:
    """`family`: the model family of the entry point (sdxl_train_network.py: "sdxl", train_network.py: "sd1")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging("INFO", None, True)  # until the flags are parsed, so their warnings show
    return guarded(prog, argv, lambda: _train(argv, prog, family))


def _train(argv: list[str], prog: str, family: str) -> int:
    from lorakit.config import parse_train_args

    config = parse_train_args(argv, prog=prog, family=family)
    configure_logging(config.console_log_level, config.console_log_file, config.console_log_simple)
    from lorakit.train.events import EventsLog
    from lorakit.train.interrupt import TrainingInterrupted
    from lorakit.train.trainer import train

    with EventsLog.of_main_process(None if config.dry_run else config.events_log) as events:
        try:
            result = train(config, events)
        except TrainingInterrupted as stopped:
            events.write("end", status="stopped", state=str(stopped.state.absolute()) if stopped.state else None,
                         resume=stopped.command)
            raise
        except KeyboardInterrupt:  # before the loop: nothing was saved
            events.write("end", status="stopped", state=None, resume=None)
            raise
        except BaseException as error:
            events.write("end", status="failed",
                         error=one_line(error) if isinstance(error, LorakitError) else describe_unexpected(error))
            raise
        events.write("end", status="finished", final=str(result.final_file.absolute()) if result.final_file else None)
    return 0

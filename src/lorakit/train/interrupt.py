"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the current optimizer step (it then
saves a LoRA and a state and prints the command that resumes); the second exits at once. Finished files are safe
either way: every save is written under a temporary name and renamed when complete."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

EXIT_CODE = 130  # what shells report for a process ended by SIGINT


class TrainingInterrupted(SystemExit):
    """Raised by the loop after the interruption save; exits with status 130 and no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_CODE)
        self.message = message


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into `requested = True` and the second into an
    immediate exit. Outside the main thread (where Python cannot install handlers) it only offers the flag."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            print(f"\n{signal.Signals(signum).name} again: stopping now; files saved so far are intact",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a LoRA and a state "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def resume_command(argv: Sequence[str], state_dir: str | Path, executable: str = sys.executable) -> str:
    """The command line that continues this run: the original one (any --resume dropped) plus --resume."""
    program, args = argv[0], list(argv[1:])
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    if Path(program).name == "__main__.py":
        prefix = [executable, "-m", Path(program).parent.name]
    elif program.endswith(".py"):
        prefix = [executable, program]
    else:
        prefix = [program]
    return shlex.join(prefix + kept + ["--resume", str(state_dir)])

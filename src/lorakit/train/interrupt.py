"""Ctrl-C, SIGTERM and SIGHUP during training: the first asks the loop to stop after the current optimizer step
(it then saves a LoRA and a state and prints the command that resumes); the second exits at once. Finished files
are safe either way: every save is written under a temporary name and renamed when complete.

`timeout`, Slurm's `scancel`, process supervisors and cloud preemption signal the run's whole process group, data
loader workers included: workers start with these signals blocked and then ignore them (`stop_signals_blocked`,
`ignore_stop_signals`), so they keep serving batches until the main process has saved and shuts them down."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

EXIT_CODE = 130  # what shells report for a process ended by SIGINT
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class TrainingInterrupted(SystemExit):
    """Raised by the loop after the interruption save; exits with status 130 and no traceback."""

    def __init__(self, message: str, state: Path | None = None, command: str | None = None) -> None:
        super().__init__(EXIT_CODE)
        self.message, self.state, self.command = message, state, command


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM/SIGHUP into `requested = True` and the second into an
    immediate exit. Outside the main thread (where Python cannot install handlers) it only offers the flag."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
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


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals while worker processes are forked (they inherit the mask, so none can kill them
    before `ignore_stop_signals` runs); a signal that arrives meanwhile is delivered to this process afterwards."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal, nothing to block
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data loader worker's start (`worker_init_fn`): the main process decides when the run stops."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def without_flags(argv: Sequence[str], names: set[str]) -> list[str]:
    """`argv` without the flags `names` (`--name value` or `--name=value`)."""
    kept, skip = [], False
    for word in argv:
        name = word[2:].split("=", 1)[0] if word.startswith("--") else None
        if skip:
            skip = False
        elif name in names:
            skip = "=" not in word
        else:
            kept.append(word)
    return kept


def resume_command(argv: Sequence[str], state_dir: str | Path, executable: str = sys.executable) -> str:
    """The command line that continues this run: the original one (any --resume dropped) plus --resume."""
    program, kept = argv[0], without_flags(argv[1:], {"resume"})
    if Path(program).name == "__main__.py":
        prefix = [executable, "-m", Path(program).parent.name]
    elif program.endswith(".py"):
        prefix = [executable, program]
    else:
        prefix = [program]
    return shlex.join(prefix + kept + ["--resume", str(state_dir)])

"""Bad input and the last-resort handler: what reaches the user of a lorakit command is one line, never a traceback.

`LorakitError` is bad input (a flag, a file, a config key): its message is the whole explanation, printed as one
line with exit code 2. Anything else that escapes a command is unexpected: `guarded` prints one line naming it
and the path of a report file (the traceback, the command, the versions) to attach to a bug report, exit code 1.
Internal bugs stay visible that way; they are never silenced.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
REPORTED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow", "numpy", "pydantic")


class LorakitError(Exception):
    """Bad input from the user (a flag, a file, a config key). The message is the whole explanation."""


def one_line(text: str) -> str:
    """A message on one line (messages that quote other tools' text may carry newlines)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def guarded(prog: str, argv: Sequence[str], body: Callable[[], int]) -> int:
    """Run a command's `body`; every way it can fail ends in one line on stderr and an exit code."""
    try:
        return body()
    except LorakitError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files saved so far are intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the last resort: one line and a report, never a traceback
        report = write_report(error, [prog, *argv])
        print(f"{prog}: {describe_unexpected(error)} (full report: {report})", file=sys.stderr)
        return EXIT_INTERNAL


def describe_unexpected(error: BaseException) -> str:
    """What the user reads about an exception lorakit did not foresee: the machine's limits are named as such."""
    text = one_line(error) or type(error).__name__
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return (f"error: out of memory ({text[:200]}); lower --train_batch_size or the resolution, or add "
                "--gradient_checkpointing, --cache_latents, --cache_text_encoder_outputs")
    if isinstance(error, OSError) and error.filename is not None:
        from lorakit.fileio import shown_path

        return f"error: {shown_path(str(error.filename))}: {error.strerror or text}"
    return f"internal error: {type(error).__name__}: {text[:300]}; please report it with the file below"


def write_report(error: BaseException, argv: Sequence[str]) -> Path | str:
    """The report of an unexpected exception: the command, the traceback and the versions, in
    $LORAKIT_REPORT_DIR (default: a lorakit-reports folder in the system's temporary folder)."""
    folder = Path(os.environ.get("LORAKIT_REPORT_DIR") or Path(tempfile.gettempdir()) / "lorakit-reports")
    path = folder / f"lorakit-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    lines = [f"command: {' '.join(argv)}", f"working folder: {os.getcwd()}", f"python: {sys.version.split()[0]}",
             f"platform: {platform.platform()}"]
    lines += [f"{name}: {_version(name)}" for name in REPORTED_PACKAGES]
    lines += ["", "".join(traceback.format_exception(error))]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines), encoding="utf-8")
    except OSError as write_error:
        return f"not written: {write_error.strerror}"
    return path


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

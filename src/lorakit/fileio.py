"""Atomic writes: everything lorakit saves goes to a temporary name first and is renamed when complete,
so an interrupted run (Ctrl-C, crash, full disk) never leaves a truncated file under the real name."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: Path) -> Path:
    """A name beside `path` that no reader mistakes for the real file (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder into; on success it replaces `path` at once.

    On any exception the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    _remove(temporary)
    try:
        yield temporary
        if temporary.is_file():
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and temporary.is_dir():
            # A folder cannot be replaced atomically by rename; move the old one aside first.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()

"""Files: atomic writes, and reading the text files users hand lorakit.

Everything lorakit saves goes to a temporary name first and is renamed when complete, so an interrupted run
(Ctrl-C, crash, full disk) never leaves a truncated file under the real name; the finished file gets the mode the
user's umask gives, as a plain `open()` would. Text files are read as UTF-8 (a byte-order mark is dropped), and any
problem reading or parsing one is a LorakitError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

from lorakit.errors import LorakitError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def temporary_sibling(path: Path) -> Path:
    """A name beside `path` that no reader mistakes for the real file (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder into; on success it replaces `path` at once.

    On any exception the temporary is removed and `path` is untouched; a file system that refuses the write (no
    space, no permission, a folder in the way) is a LorakitError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LorakitError(f"cannot write {shown_path(path)}: {describe_os_error(error)}") from None
    temporary = temporary_sibling(path)
    _remove(temporary)
    try:
        yield temporary
        apply_umask(temporary)
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
    except OSError as error:
        raise LorakitError(f"cannot write {shown_path(path)}: {describe_os_error(error)}") from None
    finally:
        _remove(temporary)


def apply_umask(path: Path) -> None:
    """Give a finished file (or a folder and everything in it) the mode the user's umask gives a new file:
    safetensors writes its files readable by their owner only, which a ComfyUI or A1111 running as another user
    (or in a container with another uid) cannot read."""
    mask = current_umask()
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def current_umask() -> int:
    """The process's umask: Linux says it in /proc without changing it; elsewhere it is set and set back."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def read_text(path: str | os.PathLike, what: str) -> str:
    """The text of a user's file; `what` names it in messages (e.g. "--sample_prompts", "caption file")."""
    path = Path(path)
    if kind_of(path, what) == "other":  # a pipe or a device would block or never end
        raise LorakitError(f"{what} {path}: not a regular file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise LorakitError(f"{what} {path} is not UTF-8 text (byte 0x{byte:02x} at offset {error.start}): re-save "
                           "it as UTF-8") from None
    except FileNotFoundError:
        raise LorakitError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise LorakitError(f"{what} {path}: is a folder; expected a file") from None
    except OSError as error:
        raise LorakitError(f"{what} {path}: cannot read it ({describe_os_error(error)})") from None


def parse_toml(text: str, path: str | os.PathLike, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LorakitError(f"{what} {path}: invalid TOML: {error}") from None
    except RecursionError:
        raise LorakitError(f"{what} {path}: arrays or tables nested too deeply") from None


def parse_json(text: str, path: str | os.PathLike, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LorakitError(f"{what} {path}: invalid JSON at line {error.lineno}, column {error.colno}: "
                           f"{error.msg}") from None
    except RecursionError:
        raise LorakitError(f"{what} {path}: arrays or objects nested too deeply") from None


def kind_of(path: str | os.PathLike, what: str) -> str | None:
    """"file", "folder", "other" (a device, a socket, ...) or None when nothing is there. A path the system
    cannot even look up (too long, a folder without permission, a NUL byte) is a LorakitError naming it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
        raise LorakitError(f"{what} {shown_path(path)}: cannot look it up ({reason})") from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def shown_path(path: str | os.PathLike) -> str:
    """A path as a message shows it: whole, or its ends when it is too long to read in one line."""
    text = os.fspath(path)
    return text if len(text) <= 200 else f"{text[:100]}...{text[-60:]} ({len(text)} characters)"


def describe_os_error(error: OSError) -> str:
    """"No such file or directory", "File name too long", ... without the path (messages name it themselves)."""
    return error.strerror or type(error).__name__

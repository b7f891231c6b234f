"""`--events_log`: the run's events as JSON lines, for programs that watch a run (`lorakit ui`, scripts).

One object per line, each with `event` and `time` (Unix seconds):

- `start`: `pid`, `max_train_steps`, `num_epochs`, `steps_per_epoch`, `first_step` (above 0 when resumed),
  `output_dir`, `output_name`
- `log`: `step` and `values` — every scalar the trackers get (`loss/current`, `loss/average`, `lr/<group>`,
  `loss/validation/...`, `loss/epoch`)
- `samples`: `step` and `images` (the PNGs of one sampling point; each carries its prompt in its `parameters`)
- `saved`: `kind` ("step", "epoch", "final", "interrupted"), `path` (the LoRA file), `state` (its state folder or
  null)
- `end`: `status` ("finished", "stopped" or "failed"), and `final` (finished), `state` and `resume` (stopped
  after the interruption save), `error` (failed: the one line the console got)

Paths are absolute; a value that is not a finite number is written as null (strict JSON). Lines are appended and
flushed one at a time, so a reader sees whole lines; only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from lorakit.errors import LorakitError
from lorakit.fileio import describe_os_error


class EventsLog:
    """Appends events to `path`; with `path` None every method does nothing."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self._file: TextIO | None = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
            except OSError as error:
                raise LorakitError(f"--events_log {self.path}: cannot write it ({describe_os_error(error)})") from None

    @classmethod
    def of_main_process(cls, path: str | os.PathLike | None) -> EventsLog:
        """The log of a run: written by the process of rank 0 only (`accelerate launch` sets RANK)."""
        return cls(path if os.environ.get("RANK", "0") == "0" else None)

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(finite({"event": event, "time": round(time.time(), 3), **fields}),
                                    default=str, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity (in nested dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value

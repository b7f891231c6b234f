"""Reading a run's `--events_log` (lorakit.train.events): its progress, curves, samples, saves and end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

RATE_WINDOW = 20  # steps over which it/s is measured


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines from byte `offset` on, and the offset after the last complete line (a line still being
    written is left for the next read)."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            data = file.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a damaged line costs that line only
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


@dataclass
class RunWatch:
    """What the events of a run say so far; `add` folds in new events."""

    max_train_steps: int | None = None
    first_step: int = 0
    step: int = 0
    output_dir: str | None = None
    step_times: list[tuple[int, float]] = field(default_factory=list)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    saves: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @classmethod
    def of(cls, path: Path) -> RunWatch:
        watch = cls()
        watch.add(read_events(path)[0])
        return watch

    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "start":
                self.max_train_steps = event.get("max_train_steps")
                self.first_step = self.step = event.get("first_step", 0)
                self.output_dir = event.get("output_dir")
                self.step_times = []
            elif kind == "log":
                step = int(event.get("step", 0))
                values = event.get("values") or {}
                for key, value in values.items():
                    self.series.setdefault(key, []).append((step, value))
                if "loss/current" in values:
                    self.step = step
                    self.step_times.append((step, float(event.get("time", 0))))
                    del self.step_times[:-RATE_WINDOW - 1]
            elif kind == "samples":
                self.samples.append({"step": event.get("step"), "images": event.get("images", [])})
            elif kind == "saved":
                self.saves.append(event)
            elif kind == "end":
                self.end = event

    def rate(self) -> float | None:
        """Optimizer steps per second over the last steps."""
        if len(self.step_times) < 2:
            return None
        (first_step, first_time), (last_step, last_time) = self.step_times[0], self.step_times[-1]
        return (last_step - first_step) / (last_time - first_time) if last_time > first_time else None

    def progress(self) -> dict[str, Any]:
        rate = self.rate()
        left = None
        if rate and self.max_train_steps:
            left = (self.max_train_steps - self.step) / rate
        return {"step": self.step, "total": self.max_train_steps, "rate": rate, "eta": left,
                "end": self.end}


def sample_prompt(path: Path) -> str:
    """The prompt a sample image records in its PNG `parameters` text (first line), or "" when it has none."""
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters", "")
    except OSError:
        return ""
    return str(text).split("\n", 1)[0]


def tail_lines(path: Path, count: int = 200) -> list[str]:
    """The last `count` lines of a log (progress-bar redraws, separated by carriage returns, count as one)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - 64 * 1024))
            data = file.read()
    except FileNotFoundError:
        return []
    lines = [line.rsplit("\r", 1)[-1] for line in data.decode("utf-8", "replace").split("\n")]
    return [line for line in lines if line.strip()][-count:]

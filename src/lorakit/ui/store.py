"""The run queue: one SQLite table under the UI's root folder, so it survives a crashed or restarted server.

A run's life: `queued` → `running` → `finished` | `stopped` (Stop: saved a LoRA and a state) | `failed` |
`interrupted` (its process vanished without saying how it ended: killed, machine reset); `stopping` while a Stop
is under way; `cancelled` when taken out of the queue before it started. Every change of status goes through
`transition`, which only moves a run that is in one of the expected statuses: two clicks, two servers or a click
racing the supervisor cannot move it twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ACTIVE = ("running", "stopping")
ENDED = ("finished", "stopped", "failed", "interrupted", "cancelled")
RESUMABLE = ("stopped", "interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    position REAL NOT NULL,
    status TEXT NOT NULL,
    argv TEXT NOT NULL,             -- JSON list: the arguments after `lorakit train`
    command TEXT NOT NULL,          -- the same as sd-scripts users type it
    folder TEXT NOT NULL,           -- the run's own folder: config.toml, events.jsonl, log.txt
    output_dir TEXT,
    pid INTEGER,
    pid_started REAL,               -- the process's start time: a reused pid is not this run
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    exit_code INTEGER,
    resume_of INTEGER,              -- the run this one resumes
    state TEXT,                     -- the state folder a Resume continues from
    message TEXT                    -- how it ended, in one line
)
"""


@dataclass(frozen=True)
class Run:
    id: int
    name: str
    position: float
    status: str
    argv: list[str]
    command: str
    folder: Path
    output_dir: str | None
    pid: int | None
    pid_started: float | None
    created: float
    started: float | None
    ended: float | None
    exit_code: int | None
    resume_of: int | None
    state: str | None
    message: str | None

    @property
    def events_path(self) -> Path:
        return self.folder / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    @property
    def config_path(self) -> Path:
        return self.folder / "config.toml"


class Store:
    """The queue's database (`<root>/.lorakit-ui/queue.sqlite3`). Each call opens its own connection, so the
    supervisor thread and the request handlers never share one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def add(self, *, name: str, command: str, output_dir: str | None, folder_of: Callable[[int], Path],
            prepare: Callable[[Path], list[str]], resume_of: int | None = None) -> Run:
        """Queue a run at the end. Its folder is `folder_of(id)`; `prepare(folder)` writes what the run needs
        there and gives its arguments. Both happen before the row is committed, so nobody starts a run whose
        files are not written yet."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT MAX(position) FROM runs").fetchone()[0]
                cursor = db.execute(
                    "INSERT INTO runs (name, position, status, argv, command, folder, output_dir, created, "
                    "resume_of) VALUES (?, ?, 'queued', '[]', ?, '', ?, ?, ?)",
                    (name, (last or 0) + 1, command, output_dir, time.time(), resume_of))
                run_id = cursor.lastrowid
                folder = folder_of(run_id)
                folder.mkdir(parents=True, exist_ok=True)
                argv = prepare(folder)
                db.execute("UPDATE runs SET folder = ?, argv = ? WHERE id = ?", (str(folder), json.dumps(argv),
                                                                                 run_id))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return self.get(run_id)

    def get(self, run_id: int) -> Run | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def runs(self, statuses: Iterable[str] | None = None) -> list[Run]:
        """Runs in queue order (position), optionally only those in `statuses`."""
        with closing(self._connect()) as db:
            if statuses is None:
                rows = db.execute("SELECT * FROM runs ORDER BY position").fetchall()
            else:
                wanted = tuple(statuses)
                rows = db.execute(f"SELECT * FROM runs WHERE status IN ({','.join('?' * len(wanted))}) "
                                  "ORDER BY position", wanted).fetchall()
        return [_run(row) for row in rows]

    def transition(self, run_id: int, expected: Iterable[str], status: str, **fields: Any) -> bool:
        """Set `status` (and `fields`) only if the run is in one of the `expected` statuses; True if it moved."""
        expected = tuple(expected)
        names = ["status", *fields]
        values = [status, *fields.values()]
        with closing(self._connect()) as db:
            cursor = db.execute(
                f"UPDATE runs SET {', '.join(f'{name} = ?' for name in names)} WHERE id = ? "
                f"AND status IN ({','.join('?' * len(expected))})", (*values, run_id, *expected))
        return cursor.rowcount == 1

    def move(self, run_id: int, offset: int) -> bool:
        """Swap a queued run with its `offset`-th queued neighbour (-1: earlier, +1: later)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            queued = [(row["id"], row["position"]) for row in
                      db.execute("SELECT id, position FROM runs WHERE status = 'queued' ORDER BY position")]
            ids = [run for run, _ in queued]
            if run_id not in ids or not 0 <= ids.index(run_id) + offset < len(ids):
                db.execute("ROLLBACK")
                return False
            here, there = ids.index(run_id), ids.index(run_id) + offset
            db.execute("UPDATE runs SET position = ? WHERE id = ?", (queued[there][1], queued[here][0]))
            db.execute("UPDATE runs SET position = ? WHERE id = ?", (queued[here][1], queued[there][0]))
            db.execute("COMMIT")
        return True


def _run(row: sqlite3.Row) -> Run:
    values = dict(row)
    values["argv"] = json.loads(values["argv"])
    values["folder"] = Path(values["folder"])
    return Run(**values)

"""Starting, stopping, resuming and reconciling the queue's runs.

Each run is a plain `python -m lorakit train --config_file <its config.toml> --events_log <its events.jsonl>`
process in a session of its own: stopping or killing the server leaves it training, and a server started later
finds it again by its pid and start time. Stop sends it SIGINT, as Ctrl-C does (finish the step, save a LoRA and a
state, exit). How a run ended is read from its events log; a process that vanished without an `end` event was
killed, and the run is marked interrupted with the newest state it saved, so Resume can continue from there.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from lorakit.train.interrupt import without_flags
from lorakit.ui.store import ACTIVE, RESUMABLE, Run, Store
from lorakit.ui.watch import RunWatch

logger = logging.getLogger("lorakit.ui")

TICK_SECONDS = 0.5


class Supervisor:
    """Runs the queue one run at a time (one device). `tick` does one round; `start_thread` runs it forever."""

    def __init__(self, store: Store, root: Path, python: str = sys.executable,
                 environment: dict[str, str] | None = None) -> None:
        self.store, self.root, self.python = store, root, python
        self.environment = environment
        self.children: dict[int, subprocess.Popen] = {}  # processes this server started (to reap them)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the loop

    def tick(self) -> None:
        with self._lock:
            self.reconcile()
            if not self.store.runs(ACTIVE):
                queued = self.store.runs(["queued"])
                if queued:
                    self._start(queued[0])

    def start_thread(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the queue must keep going; the error is logged
                    logger.exception("queue supervisor")
                self._stop.wait(TICK_SECONDS)

        self._thread = threading.Thread(target=loop, name="lorakit-ui-queue", daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reconcile(self) -> None:
        """Every running or stopping run whose process is gone gets its final status."""
        for run in self.store.runs(ACTIVE):
            child = self.children.get(run.id)
            if child is not None and child.pid != run.pid:  # not the process that runs it (another server's)
                child = None
            exit_code = child.poll() if child is not None else None
            if child is not None and exit_code is None:
                continue
            if child is None and process_alive(run.pid, run.pid_started):
                continue
            self.children.pop(run.id, None)
            self._finish(run, exit_code)

    def _finish(self, run: Run, exit_code: int | None) -> None:
        watch = RunWatch.of(run.events_path)
        end = watch.end or {}
        state = end.get("state") or newest_state(watch)
        if end.get("status") == "finished":
            status, message = "finished", f"saved {end.get('final')}"
        elif end.get("status") == "stopped":
            status = "stopped"
            message = (f"stopped and saved; resume with: {end['resume']}" if end.get("resume") and state
                       else "stopped before training started: nothing was saved")
        elif end.get("status") == "failed":
            status, message = "failed", end.get("error") or f"exit code {exit_code}"
        elif exit_code is not None and exit_code > 0:
            status, message = "failed", f"exit code {exit_code}: {last_error_line(run)}"
        else:  # killed by a signal, or gone while no server watched it
            how = f"killed by {signal.Signals(-exit_code).name}" if exit_code else "ended without saying how"
            status = "interrupted"
            message = f"the process {how}" + (f"; Resume continues from {state}" if state
                                               else "; no state was saved")
        self.store.transition(run.id, ACTIVE, status, ended=time.time(), exit_code=exit_code, state=state,
                              message=message, pid=None)

    def _start(self, run: Run) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        argv = [self.python, "-m", "lorakit", "train", *run.argv, "--events_log", str(run.events_path)]
        environment = dict(os.environ if self.environment is None else self.environment)
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(read_secrets(run.folder))
        with open(run.log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            child = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=environment)
        self.children[run.id] = child
        started = psutil.Process(child.pid).create_time()
        if not self.store.transition(run.id, ["queued"], "running", pid=child.pid, pid_started=started,
                                     started=time.time()):
            os.killpg(child.pid, signal.SIGKILL)  # cancelled, or started by another server, meanwhile
            child.wait()
            self.children.pop(run.id)

    # ------------------------------------------------------------------ what the page asks for

    def stop(self, run_id: int) -> str:
        """Stop a running run as Ctrl-C does; take a queued one out of the queue. Repeating it does nothing."""
        with self._lock:
            run = self.store.get(run_id)
            if run is None:
                return "no such run"
            if self.store.transition(run_id, ["queued"], "cancelled", ended=time.time(),
                                     message="cancelled before it started"):
                return "cancelled"
            if self.store.transition(run_id, ["running"], "stopping"):
                try:
                    os.killpg(run.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
                except ProcessLookupError:  # it ended meanwhile: the next tick says how
                    return "stopping"
                except PermissionError:  # the pid is another user's now: the run is gone
                    self.store.transition(run_id, ["stopping"], "running")
                    return "not stopped: its process belongs to another user"
                return "stopping"
            return run.status

    def resume(self, run_id: int) -> Run | None:
        """Queue the run's continuation from its last state (once: asking again, or asking a run that was already
        continued, gives its continuation, so an older state never overwrites a newer run's files)."""
        with self._lock:
            run = self.store.get(run_id)
            if run is None or run.status not in RESUMABLE or not run.state:
                return None
            for other in self.store.runs():
                if other.resume_of == run_id and other.status != "cancelled":
                    return other
            argv = without_flags(run.argv, {"resume"}) + ["--resume", run.state]  # a resumed run's newer state

            def prepare(folder: Path) -> list[str]:
                write_secrets(folder, read_secrets(run.folder))
                return argv

            return self.store.add(name=run.name, command=command_text(argv), output_dir=run.output_dir,
                                  folder_of=self.folder_of, prepare=prepare, resume_of=run_id)

    def folder_of(self, run_id: int) -> Path:
        return self.root / ".lorakit-ui" / "runs" / f"{run_id:05d}"


def process_alive(pid: int | None, started: float | None) -> bool:
    """Whether `pid` is still the process that was started at `started` (pids are reused)."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and (started is None or abs(process.create_time() - started) < 1))
    except psutil.Error:
        return False


def newest_state(watch: RunWatch) -> str | None:
    """The newest state folder the run saved that still exists."""
    for save in reversed(watch.saves):
        if save.get("state") and Path(save["state"]).is_dir():
            return save["state"]
    return None


def last_error_line(run: Run) -> str:
    from lorakit.ui.watch import tail_lines

    lines = tail_lines(run.log_path, 20)
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


SECRETS_FILE = "secrets.json"


def write_secrets(folder: Path, environment: dict[str, str]) -> None:
    """A run's secret environment variables, readable by this user only (nothing when there are none)."""
    if environment:
        path = folder / SECRETS_FILE
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(environment, file)


def read_secrets(folder: Path) -> dict[str, str]:
    path = folder / SECRETS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def command_text(argv: list[str]) -> str:
    """The run as sd-scripts users type it."""
    return shlex.join(["sdxl_train_network.py", *argv])

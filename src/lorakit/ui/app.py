"""`lorakit ui`'s web app (Starlette): the queue, the run form, dataset previews, and the live view of a run.

Pages are rendered on the server (Jinja2); a little JavaScript validates the form as it is typed, refreshes the
queue and follows a run over server-sent events, and uPlot draws the curves. Every asset ships in the package.

Security: files are served only from under the root folder and the folders runs and previews name; requests must
name this server as their host (a page elsewhere cannot reach it through DNS rebinding); with a token (`lorakit
ui` always sets one) every request must carry it; every state change is a POST that carries the page's CSRF token
and, when the browser sends one, this server's Origin; served files show as images or text only, in a sandbox.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import secrets
import shlex
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from lorakit.errors import LorakitError, one_line
from lorakit.fileio import atomic_path
from lorakit.ui import form as run_form
from lorakit.ui.preview import dataset_preview, dry_run
from lorakit.ui.store import ENDED, Run, Store
from lorakit.ui.supervisor import SECRETS_FILE, Supervisor, write_secrets
from lorakit.ui.watch import RunWatch, read_events, sample_prompt, tail_lines

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
TOKEN_COOKIE = "lorakit_token"
STREAM_SECONDS = 0.1  # how often the live view looks for news
THUMBNAIL_SIDES = (96, 160, 320)
# What /files shows in the page; every other file is sent as a download.
SHOWN_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".txt": "text/plain; charset=utf-8",
               ".log": "text/plain; charset=utf-8", ".toml": "text/plain; charset=utf-8",
               ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8"}


class Settings:
    def __init__(self, root: Path, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.root = root.resolve()
        self.token = token
        self.hosts = hosts  # None: any Host header (the token guards the server)
        self.csrf = secrets.token_urlsafe(32)
        self.previewed: set[Path] = set()  # image folders the user's previews named


def create_app(root: str | Path, *, token: str | None = None, hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
               supervise: bool = True, environment: dict[str, str] | None = None) -> Starlette:
    """The app for `root` (the folder holding the queue database and the runs' files). `supervise` starts the
    queue's supervisor thread with the app; `environment` is what runs are started with (default: this one)."""
    settings = Settings(Path(root), token, hosts)
    store = Store(settings.root / ".lorakit-ui" / "queue.sqlite3")
    supervisor = Supervisor(store, settings.root, environment=environment)
    pages = Pages(settings, store, supervisor)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        supervisor.reconcile()
        if supervise:
            supervisor.start_thread()
        yield
        supervisor.stop_thread()

    routes = [
        Route("/", pages.queue_page),
        Route("/api/runs", pages.runs_json),
        Route("/api/form", pages.form_json, methods=["POST"]),
        Route("/api/inspect", pages.inspect_json),
        Route("/new", pages.new_page),
        Route("/new", pages.new_submit, methods=["POST"]),
        Route("/datasets", pages.datasets_page),
        Route("/datasets", pages.datasets_submit, methods=["POST"]),
        Route("/runs/{run_id:int}", pages.run_page),
        Route("/runs/{run_id:int}/stream", pages.run_stream),
        Route("/runs/{run_id:int}/stop", pages.stop, methods=["POST"]),
        Route("/runs/{run_id:int}/resume", pages.resume, methods=["POST"]),
        Route("/runs/{run_id:int}/move", pages.move, methods=["POST"]),
        Route("/files", pages.file),
        Route("/thumb", pages.thumbnail),
        Mount("/static", StaticFiles(directory=str(resources.files("lorakit.ui") / "static")), name="static"),
    ]
    # Pages and scripts compress about tenfold; the event stream is never buffered for it (Starlette skips it).
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(GZipMiddleware, minimum_size=1024)])
    app.state.settings, app.state.store, app.state.supervisor = settings, store, supervisor
    return Guard(app, settings)


class Pages:
    """The app's request handlers, over one root folder's settings, queue and supervisor."""

    def __init__(self, settings: Settings, store: Store, supervisor: Supervisor) -> None:
        self.settings, self.store, self.supervisor = settings, store, supervisor
        self.templates = Jinja2Templates(directory=str(resources.files("lorakit.ui") / "templates"))
        self.templates.env.globals.update(csrf=settings.csrf, sections=run_form.sections, file_url=_file_url,
                                          thumb_url=_thumb_url, time_text=_time_text)

    async def page(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    # ------------------------------------------------------------------ the queue

    async def queue_page(self, request: Request) -> Response:
        return await self.page(request, "queue.html", runs=[_run_row(run) for run in self.store.runs()])

    async def runs_json(self, request: Request) -> Response:
        return JSONResponse([_run_row(run) for run in self.store.runs()])

    async def stop(self, request: Request) -> Response:
        await checked_form(request, self.settings)
        run_id = request.path_params["run_id"]
        result = await run_in_threadpool(self.supervisor.stop, run_id)
        return _back(request, f"/runs/{run_id}", result)

    async def resume(self, request: Request) -> Response:
        await checked_form(request, self.settings)
        resumed = await run_in_threadpool(self.supervisor.resume, request.path_params["run_id"])
        if resumed is None:
            raise HTTPException(409, "this run has no saved state to resume from")
        return _back(request, f"/runs/{resumed.id}", "queued")

    async def move(self, request: Request) -> Response:
        values = await checked_form(request, self.settings)
        offset = -1 if values.get("offset") == "-1" else 1
        self.store.move(request.path_params["run_id"], offset)
        return _back(request, "/", "moved")

    # ------------------------------------------------------------------ the run form

    async def new_page(self, request: Request) -> Response:
        values: dict[str, str] = {}
        source = request.query_params.get("from")
        if source and source.isdigit() and (run := self.store.get(int(source))) is not None:
            try:
                imported = run_form.import_command(shlex.join(run.argv), self.settings.root)
            except LorakitError as error:
                return await self.page(request, "form.html", values={}, error=f"run {run.id} cannot be duplicated: "
                                       f"{one_line(error)}", check=None, status_code=400)
            imported.pop("resume", None)  # a duplicate starts afresh
            values = run_form.form_of_values(imported)
        return await self.page(request, "form.html", values=values, error=None, check=None)

    async def new_submit(self, request: Request) -> Response:
        submitted = await checked_form(request, self.settings)
        action = submitted.get("action", "queue")
        values = {key: value for key, value in submitted.items() if key not in ("csrf", "action", "import_text")}
        try:
            if action in ("import_command", "import_toml"):
                text = submitted.get("import_text", "")
                imported = (run_form.import_command(text, self.settings.root) if action == "import_command"
                            else run_form.import_toml(text))
                return await self.page(request, "form.html", values=run_form.form_of_values(imported), error=None,
                                       check=None, notice=f"imported {len(imported)} settings")
            argv = run_form.argv_of_form(values)
            await run_in_threadpool(run_form.check, argv)
        except LorakitError as error:
            return await self.page(request, "form.html", values=values, error=one_line(error), check=None,
                                   status_code=400)
        if action == "check":
            preview = await run_in_threadpool(dataset_preview, argv)
            for dataset in preview["datasets"]:
                self.settings.previewed.update(Path(folder).resolve() for folder in dataset["image_dirs"])
            checked = await run_in_threadpool(dry_run, argv, self.settings.root)
            return await self.page(request, "form.html", values=values, error=None,
                                   check={"preview": preview, "dry_run": checked, "command": run_form.command_of(argv),
                                          "toml": run_form.toml_of(argv)})
        run = await run_in_threadpool(queue_run, self.store, self.supervisor, self.settings.root, argv)
        return RedirectResponse(f"/runs/{run.id}", status_code=303)

    async def form_json(self, request: Request) -> Response:
        """The form as the page has it now: its error, or the command and TOML it makes."""
        submitted = await checked_form(request, self.settings)
        values = {key: value for key, value in submitted.items() if key not in ("csrf", "action", "import_text")}
        try:
            argv = run_form.argv_of_form(values)
            warnings = await run_in_threadpool(run_form.check, argv)
        except LorakitError as error:
            return JSONResponse({"error": one_line(error), "warnings": []})
        return JSONResponse({"error": None, "warnings": warnings, "command": run_form.command_of(argv),
                             "toml": run_form.toml_of(argv)})

    # ------------------------------------------------------------------ datasets

    async def datasets_page(self, request: Request) -> Response:
        chosen = request.query_params.get("path", "")
        text = ""
        if chosen:
            path = _inside(self.settings, chosen)
            try:
                text = path.read_text(encoding="utf-8") if path.is_file() else ""
            except (OSError, UnicodeDecodeError) as error:
                raise HTTPException(400, f"{chosen}: cannot be read as UTF-8 text ({type(error).__name__})") from None
        return await self.page(request, "datasets.html", files=_dataset_files(self.settings.root), chosen=chosen,
                               text=text, preview=None, error=None)

    async def datasets_submit(self, request: Request) -> Response:
        submitted = await checked_form(request, self.settings)
        chosen, text = submitted.get("path", "").strip(), submitted.get("text", "")
        if not chosen.endswith(".toml"):
            return await self.page(request, "datasets.html", files=_dataset_files(self.settings.root), chosen=chosen,
                                   text=text, preview=None, error="name a .toml file under the root folder",
                                   status_code=400)
        path = _inside(self.settings, chosen)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
        # The flags' rules want a model; the dataset scan never reads it.
        argv = [f"--dataset_config={path}", "--pretrained_model_name_or_path=not-read-by-the-dataset-preview"]
        preview = await run_in_threadpool(dataset_preview, argv)
        for dataset in preview["datasets"]:
            self.settings.previewed.update(Path(folder).resolve() for folder in dataset["image_dirs"])
        return await self.page(request, "datasets.html", files=_dataset_files(self.settings.root), chosen=chosen,
                               text=text, preview=preview, error=preview["error"])

    # ------------------------------------------------------------------ a run

    async def run_page(self, request: Request) -> Response:
        run = _run_or_404(self.store, request.path_params["run_id"])
        resumes = [other.id for other in self.store.runs() if other.resume_of == run.id]
        return await self.page(request, "run.html", run=_run_row(run), log=tail_lines(run.log_path, 40),
                               resumes=resumes)

    async def run_stream(self, request: Request) -> Response:
        """Server-sent events: the run's new events (samples with their prompts), its status and its log's tail."""
        run_id = request.path_params["run_id"]
        _run_or_404(self.store, run_id)

        async def messages():
            offset, last_status, last_log = 0, None, None
            while not await request.is_disconnected():
                run = self.store.get(run_id)
                new, offset = read_events(run.events_path, offset)
                payload: dict[str, Any] = {}
                if new:
                    payload["events"] = [_shown_event(event) for event in new]
                status = (run.status, run.message, run.state)
                if status != last_status:
                    payload["status"] = _run_row(run)
                    last_status = status
                log_stamp = _stamp(run.log_path)
                if log_stamp != last_log:
                    payload["log"] = tail_lines(run.log_path, 40)
                    last_log = log_stamp
                if payload:
                    yield f"data: {json.dumps(payload)}\n\n"
                await asyncio.sleep(STREAM_SECONDS if run.status not in ENDED else 1.0)

        return StreamingResponse(messages(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def inspect_json(self, request: Request) -> Response:
        from lorakit.network.inspect import format_summary, inspect_file

        path = _allowed_file(self.settings, self.store, request.query_params.get("path", ""))
        try:
            return PlainTextResponse(format_summary(await run_in_threadpool(inspect_file, str(path))))
        except LorakitError as error:
            return PlainTextResponse(one_line(error), status_code=400)

    # ------------------------------------------------------------------ files

    async def file(self, request: Request) -> Response:
        """Images and plain text are shown; anything else (a LoRA, an HTML file) is only ever downloaded, and
        nothing served here may run scripts under this server's address."""
        path = _allowed_file(self.settings, self.store, request.query_params.get("path", ""))
        shown = path.suffix.lower() in SHOWN_TYPES and request.query_params.get("download") != "1"
        return FileResponse(path, media_type=SHOWN_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                            filename=None if shown else path.name,
                            content_disposition_type="inline" if shown else "attachment",
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "sandbox; default-src 'none'"})

    async def thumbnail(self, request: Request) -> Response:
        path = _allowed_file(self.settings, self.store, request.query_params.get("path", ""))
        size = int(request.query_params.get("size", "160")) if request.query_params.get("size", "").isdigit() else 160
        side = min(THUMBNAIL_SIDES, key=lambda s: abs(s - size))
        try:
            data = await run_in_threadpool(_thumbnail, str(path), path.stat().st_mtime_ns, side)
        except (OSError, Image.DecompressionBombError, ValueError):
            raise HTTPException(415, f"{path.name}: not an image this app can show") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# ---------------------------------------------------------------------------------------------- security


class Guard:
    """ASGI middleware: the Host header must name this server, and with a token every request must carry it
    (`?token=` once, which sets a cookie; or the cookie; or `Authorization: Bearer`)."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host", "")
        if self.settings.hosts is not None and _host_name(host) not in self.settings.hosts:
            return await PlainTextResponse("lorakit ui: unknown Host header", status_code=421)(scope, receive, send)
        token = self.settings.token
        if token is None:
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [None])[0]
        if given is not None and _same(given, token):
            rest = urlencode([(key, value) for key, values in query.items() if key != "token" for value in values])
            response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        cookie = SimpleCookie(headers.get("cookie", "")).get(TOKEN_COOKIE)
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if any(candidate and _same(candidate, token) for candidate in
               (cookie.value if cookie else None, bearer or None)):
            return await self.app(scope, receive, send)
        return await PlainTextResponse("lorakit ui: token required: open the address `lorakit ui` printed "
                                       "(it ends in ?token=...)", status_code=401)(scope, receive, send)


def _same(given: str, secret: str) -> bool:
    """A constant-time comparison that also takes text the secret could never be (non-ASCII)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode())


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def checked_form(request: Request, settings: Settings) -> dict[str, str]:
    """The POSTed form, after the CSRF token and the Origin are checked (403 otherwise)."""
    submitted = {key: value for key, value in (await request.form()).items() if isinstance(value, str)}
    given = submitted.get("csrf") or request.headers.get("x-csrf-token", "")
    if not _same(given, settings.csrf):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page")
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise HTTPException(403, f"request from another site ({origin}) refused")
    return submitted


def _inside(settings: Settings, text: str) -> Path:
    """A path under the root folder (relative ones are relative to it); anything else is 403."""
    path = (settings.root / text).resolve()
    if "\x00" in text or not path.is_relative_to(settings.root):
        raise HTTPException(403, "not under the root folder")
    return path


def _allowed_file(settings: Settings, store: Store, text: str) -> Path:
    """A file under the root, a run's output folder or a previewed image folder; anything else is 403."""
    if not text or "\x00" in text:
        raise HTTPException(400, "no path")
    path = (settings.root / text).resolve()
    allowed = [settings.root, *settings.previewed]
    for run in store.runs():
        allowed.append(run.folder.resolve())
        if run.output_dir:
            allowed.append(Path(run.output_dir).resolve())
    if not any(path.is_relative_to(folder) for folder in allowed):
        raise HTTPException(403, "outside the root folder and the runs' folders")
    if path.name == SECRETS_FILE or path.is_relative_to(settings.root / ".lorakit-ui") and path.suffix in (
            ".sqlite3", ".sqlite3-wal", ".sqlite3-shm"):
        raise HTTPException(403, "not served")
    if not path.is_file():
        raise HTTPException(404, "no such file")
    return path


# ---------------------------------------------------------------------------------------------- helpers


def queue_run(store: Store, supervisor: Supervisor, root: Path, argv: list[str]) -> Run:
    """Queue the form's command line: its TOML in the run's folder, the run started with `--config_file`; the
    secret flags reach it as environment variables (`write_secrets`), never in the TOML, the queue or argv."""
    values = run_form.command_line_values(argv, run_form.PROG)

    def prepare(folder: Path) -> list[str]:
        config = folder / "config.toml"
        with atomic_path(config) as temporary:
            temporary.write_text(run_form.toml_of(argv), encoding="utf-8")
        write_secrets(folder, run_form.secret_environment(argv))
        return ["--config_file", str(config)]

    return store.add(name=values.get("output_name") or "run", command=run_form.command_of(argv),
                     output_dir=str((root / (values.get("output_dir") or ".")).resolve()),
                     folder_of=supervisor.folder_of, prepare=prepare)


_WATCHES: dict[Path, tuple[int, RunWatch]] = {}


def watch_of(path: Path) -> RunWatch:
    """What a run's events say, read incrementally: only the lines added since the last call are parsed."""
    offset, watch = _WATCHES.get(path, (0, None))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if watch is None or size < offset:  # new, or rewritten
        offset, watch = 0, RunWatch()
    new, offset = read_events(path, offset)
    watch.add(new)
    _WATCHES[path] = (offset, watch)
    return watch


def _run_or_404(store: Store, run_id: int) -> Run:
    run = store.get(run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    return run


def _run_row(run: Run) -> dict[str, Any]:
    watch = watch_of(run.events_path)
    progress = watch.progress()
    return {"id": run.id, "name": run.name, "status": run.status, "command": run.command, "message": run.message,
            "state": run.state, "created": run.created, "started": run.started, "ended": run.ended,
            "step": progress["step"], "total": progress["total"], "rate": progress["rate"], "eta": progress["eta"],
            "resume_of": run.resume_of, "output_dir": run.output_dir,
            "saves": [{"kind": save.get("kind"), "step": save.get("step"), "path": save.get("path"),
                       "state": save.get("state")} for save in watch.saves]}


def _shown_event(event: dict[str, Any]) -> dict[str, Any]:
    """An event for the page: sample images with their URLs and prompts."""
    if event.get("event") == "samples":
        return {**event, "images": [{"path": path, "url": _file_url(path), "thumb": _thumb_url(path, 320),
                                     "prompt": sample_prompt(Path(path))} for path in event.get("images", [])]}
    return event


def _file_url(path: str, download: bool = False) -> str:
    return "/files?" + urlencode({"path": str(path), **({"download": "1"} if download else {})})


def _thumb_url(path: str, size: int = 160) -> str:
    return "/thumb?" + urlencode({"path": str(path), "size": size})


def _time_text(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else ""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _back(request: Request, default: str, result: str) -> Response:
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse({"result": result, "url": default})
    return RedirectResponse(default, status_code=303)


def _dataset_files(root: Path) -> list[str]:
    """TOML files under the root (three levels deep at most, the UI's own folder left out)."""
    found = []
    for depth in ("*.toml", "*/*.toml", "*/*/*.toml"):
        found += [str(path.relative_to(root)) for path in root.glob(depth) if ".lorakit-ui" not in path.parts]
    return sorted(found)[:200]


@lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int, side: int) -> bytes:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()

"""`lorafit ui`'s HTTP surface: one static page and a small JSON API over the run folders under
--runs, with live curves by server-sent events that tail each run's metrics.jsonl.

Security: the page is served with a token made at start-up; every action (POST) must send it back
in `X-Lorafit-Token`, which a page of another site cannot read (CSRF). Bound to a loopback address,
only requests naming that host are served (a DNS-rebinding page gets 403). Beyond loopback
(`--host 0.0.0.0`) an API key is required: `Authorization: Bearer KEY`, or the cookie the page sets
after `/?key=KEY`. Run names are plain folder names directly under --runs: no path escapes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lorafit.errors import LorafitError
from lorafit.ui import chat, new_run
from lorafit.ui import runs as run_files

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
KEY_COOKIE = "lorafit_ui_key"
POLL_SECONDS = 0.5


@dataclass
class UiSettings:
    runs: Path
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))


def _same(given: str, expected: str) -> bool:
    """A constant-time comparison that also takes non-ASCII input (hmac's str form raises on it)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _static() -> Path:
    return Path(str(resources.files("lorafit.ui") / "static"))


def create_app(settings: UiSettings) -> FastAPI:
    root = settings.runs.resolve()
    chat_models = chat.ChatModels(root)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        chat_models.close()  # the chat's model thread ends with the page's server

    app = FastAPI(title="lorafit ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.host in LOOPBACK:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0]
            if host not in LOOPBACK:
                return JSONResponse({"error": "this server answers to its loopback address only"}, status_code=403)
        if settings.api_key is not None:
            if request.url.path == "/" and "key" in request.query_params:
                if not _same(request.query_params["key"], settings.api_key):
                    return JSONResponse({"error": "wrong key"}, status_code=401)
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(KEY_COOKIE, settings.api_key, httponly=True, samesite="strict")
                return response
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.cookies.get(KEY_COOKIE, "")
            if not _same(given, settings.api_key):
                return JSONResponse({"error": "an API key is needed: open /?key=KEY"}, status_code=401)
        token = request.headers.get("x-lorafit-token", "")
        if request.method not in ("GET", "HEAD") and not _same(token, settings.token):
            return JSONResponse({"error": "missing or wrong page token"}, status_code=403)
        return await call_next(request)

    def folder_of(name: str) -> Path:
        try:
            return run_files.run_folder(root, name)
        except run_files.RunNotFoundError:
            raise HTTPException(status_code=404, detail=f"no run {name!r} under {root}") from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        page = (_static() / "index.html").read_text(encoding="utf-8")
        return page.replace("{{TOKEN}}", settings.token).replace("{{RUNS}}", html.escape(str(root)))

    app.mount("/static", StaticFiles(directory=_static()), name="static")

    @app.get("/api/runs")
    def runs() -> dict:
        views = [view.to_json() for view in run_files.list_runs(root)]
        return {"root": str(root), "runs": views, "reports": run_files.list_reports(root)}

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict:
        return run_files.run_details(folder_of(name))

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str, start: int = 0) -> dict:
        records, next_line = run_files.read_metrics(folder_of(name), max(start, 0))
        return {"records": records, "next": next_line}

    @app.get("/api/runs/{name}/stream")
    async def stream(name: str, request: Request, start: int = 0) -> StreamingResponse:
        """metrics.jsonl as it grows (one event per line, its number as the event id) and the
        run's status whenever it changes."""
        folder = folder_of(name)

        async def events():
            last = request.headers.get("last-event-id", "")
            position, status = max(start, int(last) + 1 if last.isdigit() else 0, 0), None
            while not await request.is_disconnected():
                records, next_line = run_files.read_metrics(folder, position)
                for offset, record in enumerate(records):
                    yield f"id: {position + offset}\nevent: metric\ndata: {json.dumps(record)}\n\n"
                position = next_line
                view = run_files.describe_run(folder).to_json()
                if view != status:
                    status = view
                    yield f"event: status\ndata: {json.dumps(view)}\n\n"
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/compare")
    def compare(a: str, b: str) -> dict:
        return run_files.compare_runs(folder_of(a), folder_of(b))

    @app.get("/runs/{name}/report")
    def report(name: str) -> Response:
        """A run's report, or a `lorafit eval` report folder's (--out under --runs)."""
        try:
            return FileResponse(run_files.report_file(root, name), media_type="text/html")
        except run_files.RunNotFoundError:
            detail = f"no report {name!r} under {root} (a run's is written when it ends)"
            raise HTTPException(status_code=404, detail=detail) from None

    @app.post("/api/runs/{name}/stop")
    def stop(name: str) -> dict:
        try:
            pid = run_files.stop_run(folder_of(name))
        except ProcessLookupError as error:
            raise HTTPException(status_code=409, detail=str(error)) from None
        return {"stopped": name, "pid": pid}

    @app.post("/api/runs/{name}/resume")
    def resume(name: str) -> dict:
        folder = folder_of(name)
        try:
            pid = run_files.resume_run(folder)
        except RuntimeError as error:
            raise HTTPException(status_code=409, detail=str(error)) from None
        command = run_files.train_command(folder / "config.yaml", folder, resume=True)
        return {"resumed": name, "pid": pid, "command": new_run.shown_command(command)}

    # The chat: `lorafit serve`'s app for the models chosen, under /serve (OpenAI's /v1 routes).
    app.mount("/serve", chat.ServeMount(chat_models))

    @app.get("/api/chat/choices")
    def chat_choices() -> dict:
        """Runs with an adapter to chat with."""
        runs = run_files.list_runs(root)
        names = [v.name for v in runs if (root / v.name / "adapter" / "adapter_config.json").is_file()]
        return {"adapters": names, "chosen": chat_models.models, "max_adapters": chat.MAX_ADAPTERS}

    @app.post("/api/chat/models")
    async def chat_choose(request: Request) -> Response:
        body = await request.json()
        adapters = [str(name) for name in body.get("adapters") or []]
        base = body.get("base")
        base = None if base in (None, "") and adapters else base  # the adapters' recorded base
        try:
            models = await asyncio.to_thread(chat_models.choose, base, adapters)
        except run_files.RunNotFoundError as error:
            return JSONResponse({"error": f"no run {error} under {root}"}, status_code=404)
        except LorafitError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"models": models})

    @app.post("/api/chat/save")
    async def chat_save(request: Request) -> Response:
        body = await request.json()
        try:
            path = chat.save_record(
                root,
                str(body.get("file") or ""),
                str(body.get("prompt") or ""),
                dict(body.get("answers") or {}),
                str(body.get("chosen") or ""),
            )
        except LorafitError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"saved": str(path), "records": len(path.read_text(encoding="utf-8").splitlines())})

    @app.get("/api/form")
    def form() -> dict:
        """The new-run form: every config field, and data folders beside --runs to pick from."""
        import importlib.util

        return {
            "fields": new_run.form_fields(),
            "data_choices": data_choices(root),
            "launcher": importlib.util.find_spec("accelerate") is not None,
        }

    async def form_values(request: Request) -> tuple[str, dict, int]:
        body = await request.json()
        values = body.get("values")
        if not isinstance(values, dict):
            raise HTTPException(status_code=400, detail="expected {'name': ..., 'values': {key: value}}")
        return str(body.get("name") or ""), values, int(body.get("processes") or 1)

    def field_errors(error: new_run.FormError) -> JSONResponse:
        return JSONResponse({"errors": error.errors}, status_code=422)

    @app.post("/api/check")
    async def check(request: Request) -> Response:
        name, values, processes = await form_values(request)
        try:
            folder, config_path = new_run.check_name(root, name)
            config = new_run.build_config(values, folder)
        except new_run.FormError as error:
            return field_errors(error)
        command = new_run.shown_command(run_files.train_command(config_path, folder, processes=processes))
        return JSONResponse({"command": command, "yaml": new_run.config_to_yaml(config)})

    @app.post("/api/preview")
    async def preview(request: Request) -> Response:
        _, values, _ = await form_values(request)
        try:
            config = new_run.build_config(values, root / "preview")
            return JSONResponse(await asyncio.to_thread(new_run.preview, config))
        except new_run.FormError as error:
            return field_errors(error)
        except LorafitError as error:  # unreadable data, a template that cannot mark answers ...
            return JSONResponse({"errors": {"data.train": str(error)}}, status_code=422)

    @app.post("/api/runs")
    async def start(request: Request) -> Response:
        name, values, processes = await form_values(request)
        try:
            return JSONResponse(new_run.launch(root, name, values, processes))
        except new_run.FormError as error:
            return field_errors(error)
        except FileExistsError:
            return field_errors(new_run.FormError({"name": f"{name}.yaml appeared meanwhile: choose another name"}))

    return app


def data_choices(root: Path, limit: int = 200) -> list[str]:
    """Folders and data files beside --runs (its siblings), for the form's data fields."""
    parent = root.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        if entry == root or entry.name.startswith("."):
            continue
        if entry.is_dir() or entry.suffix.lower() in (".jsonl", ".json", ".txt", ".md", ".html", ".pdf"):
            found.append(str(entry))
        if len(found) >= limit:
            break
    return found

"""The page's chat: the base model and up to three adapters (run folders under --runs) answering
one prompt side by side, through `lorafit serve`'s own app and worker (the same continuous-batching
generation, mounted under /serve), and a prompt with its answers saved as an instruction record.

The models are loaded when a choice is made (in a thread: a base takes seconds to load) and replaced
when another is made; the worker is stopped with them and when the page's server stops."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import UsageError
from lorafit.io import write_text_atomic

MAX_ADAPTERS = 3
RECORDS_FOLDER = "chat-records"  # under --runs: the instruction files the chat saves to
RECORD_FILE = re.compile(r"^[\w][\w.+-]{0,63}$")


@dataclass
class ChatModels:
    """The serve app now mounted under /serve (None until a choice is made)."""

    root: Path
    app: object | None = None
    worker: object | None = None
    choice: tuple[str, tuple[str, ...]] | None = None
    models: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def choose(self, base: str | None, adapters: list[str]) -> list[str]:
        """Load the base (None: the one the adapters record) with `adapters` (run names) attached;
        returns the model ids to ask, the base's first."""
        from lorafit.serve.app import ServeLimits, create_app
        from lorafit.serve.host import ModelHost
        from lorafit.serve.worker import Worker
        from lorafit.ui.runs import run_folder

        if len(adapters) > MAX_ADAPTERS:
            raise UsageError(f"at most {MAX_ADAPTERS} adapters side by side")
        choice = (base or "", tuple(adapters))
        with self.lock:
            if choice == self.choice and self.app is not None:
                return self.models
            named = {name: str(run_folder(self.root, name)) for name in adapters}
            if not named and base is None:
                base = ""  # no adapter to say which base: the embedded default
            host = ModelHost(named, base, "auto", [self.root])
            worker = Worker(host, max_batch=8)
            worker.start()
            self.close()
            self.app, self.worker, self.choice = create_app(host, worker, ServeLimits()), worker, choice
            self.models = [host.base_id, *adapters]
            return self.models

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.app = self.worker = self.choice = None
        self.models = []


class ServeMount:
    """An ASGI app forwarding to the serve app of the current choice (503 before one is made)."""

    def __init__(self, models: ChatModels):
        self.models = models

    async def __call__(self, scope, receive, send):
        app = self.models.app
        if app is None:
            body = json.dumps({"error": "choose the models first (POST /api/chat/models)"}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)


def save_record(root: Path, file: str, prompt: str, answers: dict[str, str], chosen: str) -> Path:
    """Append {instruction, output (the chosen answer), answers (every model's)} to
    RUNS/chat-records/FILE.jsonl — an alpaca instruction file `lorafit train` reads as it is."""
    if not RECORD_FILE.match(file or ""):
        raise UsageError("file: a name of letters, digits, '.', '-', '_' (saved under chat-records/)")
    if chosen not in answers or not prompt.strip():
        raise UsageError("a prompt and the chosen answer (one of the answers) are needed")
    folder = root / RECORDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (file if file.endswith(".jsonl") else f"{file}.jsonl")
    record = {"instruction": prompt, "output": answers[chosen], "answers": answers, "chosen": chosen}
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text_atomic(path, before + json.dumps(record, ensure_ascii=False) + "\n")
    return path

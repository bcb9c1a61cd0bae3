"""The one thread that runs the model: it steps the continuous batcher while there is work, hands
each token to its request's callback, and runs model changes (adapter loads) between two steps, so
no forward ever sees a half-changed model. Request handlers only enqueue and wait."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lorafit.compute.continuous import ContinuousBatcher, Sequence, TokenStep
from lorafit.model.device import autocast_context
from lorafit.serve.host import ModelHost

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests wait than the server was told to hold."""


@dataclass
class Failure:
    """What a request's callback receives when the model failed under it (the server's fault)."""

    message: str


TokenCallback = Callable[[TokenStep | Failure], None]


class Worker:
    def __init__(self, host: ModelHost, max_batch: int = 16, max_queue: int = 256):
        self.host = host
        self.max_queue = max_queue
        self.batcher = ContinuousBatcher(
            host.model,
            host.device,
            max_batch=max_batch,
            autocast=lambda: autocast_context(host.precision, host.device),
        )
        self.callbacks: dict[int, TokenCallback] = {}
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.dropping: set[str] = set()  # adapters retired while sequences still use them
        # Counts the request handlers read, written only by the model's thread (the batcher's own
        # dicts may change size under a reader on another thread).
        self.running = 0
        self.queued = 0
        self.incoming = 0  # sequences submitted and not yet taken from the inbox
        self.counting = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="lorafit-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        """Sequences not decoding yet: queued in the batcher or still in the inbox."""
        return self.queued + self.incoming

    def submit(self, sequences: list[Sequence], callback: TokenCallback) -> None:
        """Queue sequences (one request's choices); QueueFullError when the queue has no room for them
        (a request alone is always taken, however many choices it asks for)."""
        with self.counting:
            waiting = self.waiting
            if waiting and waiting + len(sequences) > self.max_queue:
                raise QueueFullError
            self.incoming += len(sequences)
        self.inbox.put(("submit", (sequences, callback)))
        self.wake.set()

    def cancel(self, sequences: list[Sequence]) -> None:
        self.inbox.put(("cancel", sequences))
        self.wake.set()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run `function` on the model's thread between two steps; its result (or error) in the Future."""
        future: Future = Future()
        self.inbox.put(("call", (function, future)))
        self.wake.set()
        return future

    def _run(self) -> None:
        while not self.stopping:
            self._take_inbox()
            self._publish_counts()
            if not self.batcher.busy:
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            try:
                made = self.batcher.step()
            except Exception as exc:  # the model failed: fail what is in flight, keep serving
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
                continue
            self._publish_counts()
            for step in made:
                callback = self.callbacks.get(step.sequence.id)
                if step.finish_reason is not None:
                    self.callbacks.pop(step.sequence.id, None)
                if callback is not None:
                    deliver(callback, step)
            self._drop_unused()

    def _publish_counts(self, taken: int = 0) -> None:
        """What request handlers read (`running`, `waiting`), from the batcher, under the lock submit
        takes; `taken` sequences moved from the inbox into the batcher."""
        with self.counting:
            self.running, self.queued = self.batcher.running, self.batcher.queued
            self.incoming -= taken

    def retire_adapter(self, name: str) -> None:
        """On the model's thread: stop serving `name`; its weights go once no sequence uses them."""
        self.host.retire(name)
        self.dropping.add(name)
        self._drop_unused()

    def _drop_unused(self) -> None:
        if not self.dropping:
            return
        in_use = self.batcher.adapters_in_use()
        for name in [n for n in self.dropping if n not in in_use]:
            self.host.drop(name)
            self.dropping.discard(name)
        self.batcher.model = self.host.model

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                sequences, callback = item
                for sequence in sequences:
                    self.callbacks[sequence.id] = callback
                    self.batcher.add(sequence)
                self._publish_counts(taken=len(sequences))
            elif kind == "cancel":
                for sequence in item:
                    self.callbacks.pop(sequence.id, None)
                    self.batcher.cancel(sequence.id)
            else:
                function, future = item
                try:
                    future.set_result(function())
                except BaseException as exc:  # handed to the caller, who answers the client
                    future.set_exception(exc)
                self.batcher.model = self.host.model  # the first adapter wraps the base in a PeftModel

    def _fail_all(self, message: str) -> None:
        failed = list(self.callbacks.items())
        self.callbacks.clear()
        for sequence_id, _ in failed:
            self.batcher.cancel(sequence_id)
        self.batcher.lanes.clear()
        self.batcher.waiting.clear()
        self.batcher.cancelled.clear()
        for _, callback in failed:
            deliver(callback, Failure(message))


def deliver(callback: TokenCallback, event: TokenStep | Failure) -> None:
    """Hand an event to its request; one whose event loop is gone (the server shutting down) is dropped."""
    try:
        callback(event)
    except RuntimeError:
        log.debug("a request's event loop is closed; its event is dropped")

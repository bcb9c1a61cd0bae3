"""Signals during a run. While training steps run, Ctrl-C or SIGTERM asks the loop to stop after
the current step, so a checkpoint can be written and the run resumed exactly; a second Ctrl-C
stops at once. Outside the steps (measuring the base model, saving, scoring) there is no step to
finish: the signal interrupts at once (as KeyboardInterrupt), and the run says what it left."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into KeyboardInterrupt, or — inside `deferring()`
    — into a flag the training loop polls."""

    def __init__(self, deferred: bool = True) -> None:
        self.signal_name: str | None = None
        self.deferred = deferred
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        asked_twice = self.signal_name is not None and signum == signal.SIGINT
        self.signal_name = signal.Signals(signum).name
        if asked_twice or not self.deferred:
            raise KeyboardInterrupt  # asked twice, or nothing to finish first: stop now

    @contextlib.contextmanager
    def deferring(self) -> Iterator[StopRequests]:
        """Within this block a first signal only sets the flag (the loop finishes its step)."""
        before, self.deferred = self.deferred, True
        try:
            yield self
        finally:
            self.deferred = before

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

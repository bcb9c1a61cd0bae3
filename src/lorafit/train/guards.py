"""Signals during training: Ctrl-C or SIGTERM asks the loop to stop after the current step, so a
checkpoint can be written and the run resumed exactly; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into a flag the training loop polls."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user wants out now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

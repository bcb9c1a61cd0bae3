"""Fault injection for drills and tests, through one documented environment variable.

    LORAFIT_FAULT=kill_after_step:N   the training process sends itself SIGKILL right after
                                      optimizer step N (a real, uncatchable crash at a known point)
    LORAFIT_FAULT=term_after_step:N   ... SIGTERM instead (what a scheduler sends before a kill)

Unset (the normal case) this costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV = "LORAFIT_FAULT"


def after_step(step: int) -> None:
    fault = os.environ.get(ENV)
    if not fault:
        return
    kind, _, value = fault.partition(":")
    signals = {"kill_after_step": signal.SIGKILL, "term_after_step": signal.SIGTERM}
    if kind in signals and value.isdigit() and step == int(value):
        os.kill(os.getpid(), signals[kind])

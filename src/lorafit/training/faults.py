"""Fault injection for drills and tests, through one documented environment variable.

    LORAFIT_FAULT=kill_after_step:N   the process sends itself SIGKILL right after optimizer step N
                                      (a real, uncatchable crash at a known point)
    LORAFIT_FAULT=term_after_step:N   ... SIGTERM instead (what a scheduler sends before a kill)
    LORAFIT_FAULT=int_after_step:N    ... SIGINT instead (what Ctrl-C sends)
    LORAFIT_FAULT=oom_at_step:N       step N's first attempt raises torch.OutOfMemoryError
    LORAFIT_FAULT=nan_at_steps:A-B    the loss of steps A..B is NaN the first time each is run
                                      (a rollback that replays them then succeeds)
    LORAFIT_FAULT=nan_from_step:N     the loss of every step from N on is NaN (persistent failure)
    LORAFIT_FAULT=overflow_at_step:N  step N's first attempt back-propagates gradients 1e30 times too
                                      large (the loss stays as it is): fp16's loss scaler must skip it
    LORAFIT_FAULT=slow_steps:MS       every optimizer step takes MS milliseconds longer (a tiny model
                                      training slowly enough to watch, stop and resume from a page)
    LORAFIT_FAULT=int_at:STAGE        SIGINT when the run reaches STAGE: 'base' (measuring the base
    LORAFIT_FAULT=term_at:STAGE       model, before any step) or 'finish' (after the last step,
                                      before saving); term_at sends SIGTERM

Several faults combine with commas: LORAFIT_FAULT=overflow_at_step:2,kill_after_step:4.
Unset (the normal case) each hook costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

import torch

ENV = "LORAFIT_FAULT"
_fired: set[tuple[str, int]] = set()


def _faults() -> list[tuple[str, str]]:
    """The (kind, value) pairs of LORAFIT_FAULT."""
    return [(kind, value) for kind, _, value in (part.partition(":") for part in os.environ.get(ENV, "").split(","))]


def _once(kind: str, step: int) -> bool:
    if (kind, step) in _fired:
        return False
    _fired.add((kind, step))
    return True


def after_step(step: int) -> None:
    for kind, value in _faults():
        if kind == "slow_steps" and value.isdigit():
            time.sleep(int(value) / 1000)
    signals = {"kill_after_step": signal.SIGKILL, "term_after_step": signal.SIGTERM, "int_after_step": signal.SIGINT}
    for kind, value in _faults():
        if kind in signals and value.isdigit() and step == int(value):
            os.kill(os.getpid(), signals[kind])


def at_stage(stage: str) -> None:
    """Signal this process at a named stage of a run, outside the training steps."""
    signals = {"int_at": signal.SIGINT, "term_at": signal.SIGTERM}
    for kind, value in _faults():
        if kind in signals and value == stage:
            os.kill(os.getpid(), signals[kind])


def before_backward(step: int) -> None:
    for kind, value in _faults():
        if kind == "oom_at_step" and value.isdigit() and step == int(value) and _once(kind, step):
            raise torch.OutOfMemoryError(f"injected by {ENV}={kind}:{value}")


def loss_factor(step: int) -> float:
    """1.0, or NaN where a NaN drill applies to this step."""
    for kind, value in _faults():
        if kind == "nan_from_step" and value.isdigit() and step >= int(value):
            return float("nan")
        if kind == "nan_at_steps":
            first, _, last = value.partition("-")
            if first.isdigit() and int(first) <= step <= int(last or first) and _once(kind, step):
                return float("nan")
    return 1.0


def gradient_factor(step: int) -> float:
    """1.0, or 1e30 for the first attempt at the step an overflow drill names."""
    for kind, value in _faults():
        if kind == "overflow_at_step" and value.isdigit() and step == int(value) and _once(kind, step):
            return 1e30
    return 1.0

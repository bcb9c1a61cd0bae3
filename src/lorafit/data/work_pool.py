"""Worker processes that map a function over work units and hand the results back in order.

Processes are forked (Linux and macOS): a worker inherits the settings and the tokenizer the main
process set up instead of importing and rebuilding them. At most a few units per worker are in
flight, so results wait for the main process in bounded numbers whatever the corpus size. One
worker (or a platform without fork) runs the units in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

Unit = TypeVar("Unit")
Result = TypeVar("Result")

UNITS_IN_FLIGHT_PER_WORKER = 8


def available_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's or a job's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity
        return os.cpu_count() or 1


def worker_count(asked: int) -> int:
    """`asked` workers, 0 meaning one per available core; 1 where processes cannot be forked."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return asked if asked > 0 else available_cores()


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the main process dies. A main process killed with
    SIGKILL cannot stop its workers, and they would wait on the work queue forever."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own clean-up is all there is
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _start_worker(parent: int, setup: Callable[..., None] | None, arguments: tuple) -> None:
    _die_with(parent)
    # A forked worker inherits the command's signal handlers (a graceful stop on SIGTERM): it must
    # die on SIGTERM instead, and leave Ctrl-C to the main process, which stops the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Nor may it run the tokenizer's own thread pool on top of the process pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if setup is not None:
        setup(*arguments)


def map_in_order(
    function: Callable[[Unit], Result],
    units: Iterable[Unit],
    workers: int,
    setup: Callable[..., None] | None = None,
    setup_arguments: tuple = (),
) -> Iterator[Result]:
    """function(unit) for each unit, in the units' order, computed by `workers` processes;
    `setup(*setup_arguments)` runs first in each of them."""
    if workers <= 1:
        if setup is not None:
            setup(*setup_arguments)
        yield from map(function, units)
        return
    # A worker that dies (killed, out of memory) fails the map with BrokenProcessPool, never hangs it.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(os.getpid(), setup, setup_arguments),
    )
    try:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.submit(function, unit))
            if len(pending) >= workers * UNITS_IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

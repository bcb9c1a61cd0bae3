"""`prepare`'s progress: a bar per stage (reading and cleaning, tokenizing) with rates and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _rate(count: float, started: float) -> float:
    return count / max(time.perf_counter() - started, 1e-9)


@contextmanager
def prepare_progress(console: Console, input_bytes: int) -> Iterator[Callable[..., None]]:
    """A `report(stage, **counts)` for prepare_to_folder that draws the bars. Drawn when reported
    to, never from a thread of its own: worker processes are forked while it is shown."""
    progress = Progress(
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=False,
        transient=False,
    )
    started = {"clean": time.perf_counter()}
    seen = {"documents": 0, "kept": 0, "texts": 0, "tokens": 0}
    clean = progress.add_task("clean", total=max(input_bytes, 1), counts="")
    tokenize = None

    def report(stage: str, **counts: int) -> None:
        nonlocal tokenize
        if stage == "clean":
            seen["documents"] += counts["documents"]
            seen["kept"] = counts["kept"]
            rate = _rate(seen["documents"], started["clean"])
            progress.update(
                clean,
                advance=counts["bytes"],
                counts=f"{seen['documents']:,} documents ({rate:,.0f}/s), {seen['kept']:,} kept",
            )
        else:
            if tokenize is None:
                started["tokenize"] = time.perf_counter()
                progress.update(clean, completed=max(input_bytes, 1))
                tokenize = progress.add_task("tokenize", total=max(seen["kept"], 1), counts="")
            seen["texts"] += counts["texts"]
            seen["tokens"] += counts["tokens"]
            rate = _rate(seen["tokens"], started["tokenize"])
            progress.update(
                tokenize,
                advance=counts["texts"],
                counts=f"{seen['texts']:,} documents, {seen['tokens']:,} tokens ({rate:,.0f}/s)",
            )
        progress.refresh()

    with progress:
        yield report

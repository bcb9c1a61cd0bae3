"""A rich progress bar showing step, loss, learning rate, tokens/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def training_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def training_task(progress: Progress | None, total: int, completed: int):
    """The bar's one task, created on the first call and moved back after a rollback (one row)."""
    if progress is None:
        return None
    for task in progress.tasks:
        if task.description == "train":
            progress.reset(task.id, total=total, completed=completed)
            return task.id
    return progress.add_task("train", total=total, completed=completed, loss=0.0, lr=0.0, tps=0.0)

"""`lorafit train`: check the run folder, lock it, and run the stages of a `TrainingRun`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lorafit.artifacts import RunFolder
from lorafit.config import RunConfig
from lorafit.errors import TrainingInterruptedError
from lorafit.outputs import output_folder
from lorafit.training.checkpoint import list_checkpoints
from lorafit.training.guards import StopRequests
from lorafit.training.run_folder import REPREPARED, check_run_folder, claim_run_folder
from lorafit.training.training_run import RunResult, TrainingRun

__all__ = ["RunResult", "run_training"]


def run_training(
    config: RunConfig,
    out_dir: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    resume: str | None = None,
    ignore_changes: bool = False,
) -> RunResult:
    """The whole run; `resume` ('latest' or a checkpoint folder) continues an interrupted one exactly.

    The run folder is checked before any work and locked while the run writes it; a signal before
    the first training step stops at once and leaves the folder restartable as it is."""
    console = console or Console()
    folder = RunFolder(Path(out_dir or config.out))
    check_run_folder(folder.root, overwrite, resuming=resume is not None)
    # A run refused on its inputs leaves nothing (the documents it prepared are made again by a retry).
    with (
        output_folder(folder.root, "run", "lorafit train", disposable=REPREPARED),
        StopRequests(deferred=False) as stops,
    ):
        resuming = claim_run_folder(folder.root, resume, console)
        try:
            run = TrainingRun(config, folder, console, stops)
            run.set_up()
            if resuming:
                run.resume(resume, ignore_changes)
            else:
                run.start()
            run.train()
            return run.finish()
        except KeyboardInterrupt:
            raise interrupted_at_once(folder.root, stops.signal_name or "SIGINT") from None


def interrupted_at_once(out_dir: Path, signal_name: str) -> TrainingInterruptedError:
    """What a run stopped at once (before training, or by a second Ctrl-C) leaves, and what next."""
    found = list_checkpoints(out_dir / "checkpoints")
    if found:
        return TrainingInterruptedError(
            f"Stopped by {signal_name} at once; the newest checkpoint is {found[-1]}. Continue from it with: "
            f"lorafit train CONFIG --out {out_dir} --resume"
        )
    return TrainingInterruptedError(
        f"Stopped by {signal_name} before the first checkpoint; nothing needed saving. Start again with the same "
        f"command (no --overwrite needed): it restarts in {out_dir}."
    )

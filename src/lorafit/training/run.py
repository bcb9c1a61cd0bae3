"""`lorafit train`: check the run folder, lock it, and run the stages of a `TrainingRun`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lorafit.artifacts import RunFolder
from lorafit.config import RunConfig
from lorafit.errors import TrainingInterruptedError
from lorafit.model.device import default_device, resolve_precision
from lorafit.outputs import output_folder
from lorafit.training.checkpoint import list_checkpoints
from lorafit.training.engines import launched_engine, make_accelerator
from lorafit.training.guards import StopRequests
from lorafit.training.run_folder import REPREPARED, check_run_folder, claim_run_folder
from lorafit.training.run_state import RunResult
from lorafit.training.training_run import TrainingRun

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
    device = default_device()
    engine = launched_engine()
    accelerator = make_accelerator(config.train, resolve_precision(config.train.precision, device), device.type, engine)
    if not accelerator.is_main_process:
        # The first process checks, claims and locks the run folder; the others follow its decision
        # and print nothing (the first one's output is the run's).
        console = Console(quiet=True)
        with StopRequests(deferred=False) as stops:
            resuming = main_decision(accelerator, None)
            return _run_stages(config, folder, console, stops, accelerator, engine, resuming, resume, ignore_changes)
    check_run_folder(folder.root, overwrite, resuming=resume is not None)
    # A run refused on its inputs leaves nothing (the documents it prepared are made again by a retry).
    with (
        output_folder(folder.root, "run", "lorafit train", disposable=REPREPARED),
        StopRequests(deferred=False) as stops,
    ):
        resuming = main_decision(accelerator, claim_run_folder(folder.root, resume, console))
        return _run_stages(config, folder, console, stops, accelerator, engine, resuming, resume, ignore_changes)


def _run_stages(
    config: RunConfig,
    folder: RunFolder,
    console: Console,
    stops: StopRequests,
    accelerator,
    engine: str,
    resuming: bool,
    resume: str | None,
    ignore_changes: bool,
) -> RunResult:
    run = TrainingRun(config, folder, console, stops, accelerator, engine)
    try:
        run.set_up()
        if resuming:
            run.resume(resume, ignore_changes)
        else:
            run.start()
        run.train()
        return run.finish()
    except KeyboardInterrupt:
        raise interrupted_at_once(folder.root, stops.signal_name or "SIGINT") from None
    finally:
        run.close_trackers()  # a stopped or failed run's tracker runs end too (resumed from trackers.json)


def main_decision(accelerator, value):
    """The first process's `value` on every process (the others pass None); a barrier as well."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


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

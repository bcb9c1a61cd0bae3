"""The run folder: checked and claimed (or refused), trimmed on resume, and the fingerprints of a run's inputs."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.artifacts import RunFolder
from lorafit.config import RunConfig
from lorafit.data.pack import PackedBlocks
from lorafit.errors import UsageError
from lorafit.io import write_text_atomic
from lorafit.outputs import KINDS, check_output_folder, mark_output_folder, recognise, remove_own_entries
from lorafit.training.checkpoint import list_checkpoints

# Kept when a run starts over: documents prepared on the fly, which the new run writes again.
REPREPARED = ("data",)


def _newest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(RunFolder(out_dir).checkpoints)
    return found[-1] if found else None


def _finished(out_dir: Path) -> bool:
    return RunFolder(out_dir).finished()


def check_run_folder(out_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse, before any work, a run folder this run may not use: a file, a folder of someone
    else's files or of another lorafit output, a finished or checkpointed run without --overwrite
    (or --resume), and --resume where there is no run. A run that stopped before its first
    checkpoint is restartable as it is: nothing in it is worth keeping."""
    if resuming:
        if not RunFolder(out_dir).config.is_file():
            raise UsageError(f"--resume: {out_dir} holds no run to resume; check --out.")
        return
    if out_dir.is_dir() and recognise(out_dir) == "run" and not overwrite:
        if _finished(out_dir):
            raise UsageError(
                f"--out {out_dir} already holds a finished run (summary.json); choose another --out, or replace "
                "it with --overwrite."
            )
        newest = _newest_checkpoint(out_dir)
        if newest is not None:
            raise UsageError(
                f"--out {out_dir} holds an interrupted run (newest checkpoint {newest.name}); continue it with "
                "--resume, or start over with --overwrite."
            )
        return  # stopped before its first checkpoint: restartable
    check_output_folder(out_dir, "run", overwrite=True)


def claim_run_folder(out_dir: Path, resume: str | None, console) -> bool:
    """Set the folder up for this run (called holding its lock); returns whether to resume. A bare
    --resume without any checkpoint starts over, saying so; a new run clears what an earlier run
    wrote (lorafit's own files only: anything else in the folder is left as it is)."""
    resuming = resume is not None
    if resume == "latest" and _newest_checkpoint(out_dir) is None and not _finished(out_dir):
        console.print(f"[yellow]{out_dir} has no checkpoint yet: starting the run from the beginning[/]")
        resuming = False
    if resuming:
        return True
    if RunFolder(out_dir).config.is_file() and not _finished(out_dir) and _newest_checkpoint(out_dir) is None:
        console.print(f"[yellow]{out_dir}: the earlier attempt stopped before its first checkpoint; starting over[/]")
    mark_output_folder(out_dir, "run")
    # An old run's outputs are not ours: a different method or init would leave stale ones beside ours.
    remove_own_entries(out_dir, "run", tuple(e for e in KINDS["run"].entries if e not in REPREPARED))
    return False


def metrics_line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def keep_metrics_up_to(path: Path, step: int, lines: int | None = None) -> None:
    """On resume, drop the lines an interrupted run wrote after its last checkpoint: the first
    `lines` when the checkpoint counted them, else those up to `step`. A line cut by a crash is
    dropped too."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (number < lines) if lines is not None else (record.get("step", 0) <= step):
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# Settings that change how fast (or in how much memory) a run computes, never what: a run may resume
# with another. Gradient checkpointing recomputes the same activations (RNG state preserved); its
# default became 'auto', which a checkpoint written with `false` must not refuse.
# Where a run is watched from (trackers, the LoRA monitor) changes nothing it computes either.
SAME_RESULT_KEYS = {
    "data.workers",
    "train.gradient_checkpointing",
    "train.monitor_every",
    "train.report_to",
    "train.tracker_project",
}


def input_fingerprints(
    config: RunConfig, train_blocks: PackedBlocks, valid_blocks: PackedBlocks, base_fingerprint: str
) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    flat = {
        f"{section}.{key}": value
        for section, values in config.model_dump(mode="json").items()
        if isinstance(values, dict)
        for key, value in values.items()
        if f"{section}.{key}" not in SAME_RESULT_KEYS
    }
    return {
        "config": flat,
        "train_data": train_blocks.digest(),
        "valid_data": valid_blocks.digest(),
        "base_model": base_fingerprint,
    }

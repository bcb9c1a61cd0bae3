"""What a training run holds between its stages (`RunProgress`) and what it returns (`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.artifacts import RunFolder, RunSummary
from lorafit.evaluation.core import MeasuredModel
from lorafit.training.loop import LoopState


@dataclass
class RunProgress:
    """What the run has done so far: the loop's state and data position, the checkpoint it resumed
    from, and the base model as measured before training."""

    loop: LoopState | None = None
    position: dict | None = None
    resumed_from: str | None = None
    base: MeasuredModel | None = None


@dataclass
class RunResult:
    """What `lorafit train` (and `lorafit.train`) returns: the run folder, its summary.json as a
    dict, the saved adapter/ (or model/) and report.html (None when not written)."""

    out_dir: Path
    run_summary: RunSummary
    main_process: bool = True  # False in the other processes of a multi-process run (they save nothing)

    @property
    def summary(self) -> dict:
        return self.run_summary.to_json()

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out_dir)

    @property
    def adapter(self) -> Path | None:
        return self.folder.trained()

    @property
    def report(self) -> Path | None:
        return self.folder.report if self.folder.report.is_file() else None

"""The run's checkpoint policy in one place: when a step's end writes a checkpoint, how a run of
non-finite steps rolls back to the newest good one (with a lower learning rate), what an
interruption saves, and how a resume finds and checks the checkpoint it continues from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.artifacts import RunFolder
from lorafit.config import TrainSection
from lorafit.errors import LorafitError, UsageError
from lorafit.training.checkpoint import (
    changed_fingerprints,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
    save_checkpoint,
)
from lorafit.training.loop import LoopState, UnstableTrainingError
from lorafit.training.run_folder import keep_metrics_up_to, metrics_line_count
from lorafit.training.sharded_state import DEEPSPEED, FSDP, PLAIN, full_trainable_state, optimizer_state

ENGINE_NAMES = {PLAIN: "one process or DDP", DEEPSPEED: "DeepSpeed ZeRO", FSDP: "FSDP"}


@dataclass
class Resumed:
    """Where a resumed run continues: its loop state, data position and the checkpoint's record."""

    checkpoint: Path
    state: LoopState
    position: dict
    record: dict


@dataclass
class Checkpointer:
    folder: RunFolder
    model: torch.nn.Module  # the (unwrapped) module whose trainable weights a checkpoint holds
    optimizer: torch.optim.Optimizer
    train: TrainSection
    fingerprints: dict  # what a resume must share with the run (config, data, base weights)
    log_metrics: Callable[[dict], None]
    warn: Callable[[str], None] = lambda message: None
    # Each checkpoint's adapter/ (LoRA), from the whole trainable weights the checkpoint holds.
    save_adapter_to: Callable[[Path, LoopState, dict[str, torch.Tensor]], None] | None = None
    is_main_process: bool = True
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale, saved and restored with the rest
    world_size: int = 1  # processes of the run: a checkpoint resumes only under the same number
    engine: str = PLAIN  # sharded_state's engine: how the weights and optimizer state are gathered and restored
    barrier: Callable[[], None] = lambda: None  # every process waits here (a no-op in one process)
    base_record: dict = field(default_factory=dict)  # the base's measurements, for a resumed run's report
    rollbacks: int = 0
    last_position: dict = field(default_factory=dict)  # the data position after the newest step

    def on_step_end(self, state: LoopState, position: dict) -> None:
        """Every train.save_every steps and at the last step; never in the middle of non-finite
        steps, so a rollback always lands on a good state."""
        self.last_position = dict(position)
        finished = state.step >= self.train.max_steps or state.stopped_early
        due = self.train.save_every and (state.step % self.train.save_every == 0 or finished)
        if due and not state.bad_in_row:
            self.save(state, position)

    def save(self, state: LoopState, position: dict, metrics_lines: int | None = None) -> Path | None:
        """Checkpoint step `state.step` at `position`; `metrics_lines` is how many metrics lines belong
        to it (default: all written so far). Every process calls it: under ZeRO and FSDP each hands
        over its part of the weights and the optimizer state; only the first writes."""
        weights = full_trainable_state(self.model)
        optimizer = optimizer_state(self.engine, self.model, self.optimizer)
        if not self.is_main_process:
            return None
        lines = metrics_line_count(self.folder.metrics) if metrics_lines is None else metrics_lines
        record = {
            "position": position,
            "fingerprints": self.fingerprints,
            **self.base_record,
            "metrics_lines": lines,
            "world_size": self.world_size,
            "engine": self.engine,
        }
        save_adapter = None
        if self.save_adapter_to is not None:

            def save_adapter(folder: Path) -> None:
                self.save_adapter_to(folder, state, weights)

        return save_checkpoint(
            self.folder.checkpoints,
            weights,
            optimizer,
            state,
            record,
            save_adapter_to=save_adapter,
            keep=self.train.keep_checkpoints,
            scaler=self.scaler,
        )

    def saved_or_save(self, state: LoopState, position: dict, metrics_lines: int | None = None) -> Path | None:
        """The checkpoint of step `state.step`, written now unless it already is (an interruption)."""
        self.barrier()  # the first process has finished writing what it was writing
        saved = self.folder.checkpoints / f"step-{state.step}"
        if (saved / "state.json").is_file():
            return saved
        return self.save(state, position, metrics_lines)

    def roll_back(self, unstable: UnstableTrainingError, batch_sources: str) -> tuple[LoopState, dict]:
        """After train.max_bad_steps non-finite steps in a row: back to the newest readable checkpoint
        with the learning rate times train.rollback_lr_factor, at most train.max_rollbacks times;
        else stop with a diagnosis naming the failing batch's documents."""
        found = list_checkpoints(self.folder.checkpoints)
        if not found or self.rollbacks >= self.train.max_rollbacks:
            raise LorafitError(
                f"Training is unstable: {self.train.max_bad_steps} steps in a row up to step {unstable.step} had a "
                f"non-finite loss or gradient (last batch from: {batch_sources}); last good checkpoint: "
                f"{found[-1] if found else 'none (set train.save_every)'}; {self.rollbacks} rollback(s) tried. "
                "Lower train.lr, check those documents, or use train.precision: fp32."
            ) from None
        self.rollbacks += 1
        good, files = newest_readable(found, self.warn)
        state, record = load_checkpoint(good, self.model, self.optimizer, files, self.scaler, self.engine)
        state.rollback_lr_scale *= self.train.rollback_lr_factor
        keep_metrics_up_to(self.folder.metrics, state.step)
        # metrics.jsonl's rollback event keeps its documented key, lr_scale.
        self.log_metrics({"step": state.step, "event": "rollback", "lr_scale": state.rollback_lr_scale})
        self.warn(
            f"non-finite loss up to step {unstable.step}: rolled back to {good}, "
            f"learning rate x{state.rollback_lr_scale:g}"
        )
        return state, record["position"]

    def resume(self, resume: str, ignore_changes: bool) -> Resumed:
        """Load the checkpoint `resume` names ('latest' or a folder) into the model and optimizer,
        refusing one whose inputs differ from this run's unless `ignore_changes`; the metrics log
        is cut back to what the checkpoint had seen."""
        checkpoint, files = find_checkpoint(self.folder.root, resume, warn=self.warn)
        changes = changed_fingerprints(files.record.get("fingerprints", {}), self.fingerprints)
        if changes and not ignore_changes:
            raise UsageError(
                f"--resume {checkpoint}: the inputs changed since it was written ({'; '.join(changes)}); "
                "restore them, or pass --ignore-changes to resume anyway (the result is then not exact)."
            )
        saved_world = files.record.get("world_size", 1)
        if saved_world != self.world_size:
            raise UsageError(
                f"--resume {checkpoint}: written by a run of {saved_world} process(es), resumed with "
                f"{self.world_size}; each rank's share of the data and the batch depend on it. Resume with "
                f"--num-processes {saved_world}."
            )
        # An earlier lorafit recorded no engine: its ZeRO checkpoints are known by their partition list.
        saved_engine = files.record.get("engine") or (DEEPSPEED if isinstance(files.optimizer, list) else PLAIN)
        if saved_engine != self.engine:
            raise UsageError(
                f"--resume {checkpoint}: written under {ENGINE_NAMES[saved_engine]}, resumed under "
                f"{ENGINE_NAMES[self.engine]}; the optimizer state is kept in that engine's form. Resume under "
                f"{ENGINE_NAMES[saved_engine]}."
            )
        state, record = load_checkpoint(checkpoint, self.model, self.optimizer, files, self.scaler, self.engine)
        keep_metrics_up_to(self.folder.metrics, state.step, record.get("metrics_lines"))
        self.base_record = {key: record.get(key) for key in ("before", "general_before")}
        return Resumed(checkpoint=checkpoint, state=state, position=record["position"], record=record)

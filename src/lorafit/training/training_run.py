"""One training run as named stages: set up (inputs, model, optimizer), start or resume, train,
finish (choose the best weights, measure, save, write the records). State lives in `RunProgress`;
the checkpoint, rollback and interrupt policy in `Checkpointer`."""

from __future__ import annotations

import copy
import functools
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from lorafit.adapters.save import folder_bytes, save_adapter, save_full_model, save_initial_adapter
from lorafit.artifacts import BaseModelRecord, RunFolder, RunSummary
from lorafit.compute.objective import CausalLMObjective
from lorafit.compute.perplexity import LossResult, evaluate_loss
from lorafit.config import RunConfig
from lorafit.config_files import config_to_yaml
from lorafit.errors import TrainingInterruptedError
from lorafit.evaluation.core import MeasuredModel, measure_model
from lorafit.integrity import read_json_file
from lorafit.io import append_jsonl, write_json_atomic, write_text_atomic
from lorafit.model.device import (
    autocast_context,
    compute_dtype,
    default_device,
    loss_scaler,
    resolve_precision,
)
from lorafit.model.load import weights_fingerprint
from lorafit.model.lora import changes_base_weights, optimizer_groups
from lorafit.model.lora_norms import change_map, module_norms
from lorafit.model.prepare import prepare_trainable_model
from lorafit.training import faults
from lorafit.training.base_cache import base_measurement_file
from lorafit.training.base_stage import base_cost, measure_base, reuse_base_measurement
from lorafit.training.checkpointer import Checkpointer
from lorafit.training.engines import (
    PARTITIONED_NAMES,
    prepare_for_engine,
    refuse_under_partitioned_weights,
    weights_partitioned,
)
from lorafit.training.guards import StopRequests
from lorafit.training.inputs import describe_data, prepare_run_inputs
from lorafit.training.loop import (
    LoopEngine,
    LoopHooks,
    LoopState,
    UnstableTrainingError,
    record_validation,
    train_loop,
)
from lorafit.training.lora_monitor import make_monitor
from lorafit.training.neftune import add_embedding_noise
from lorafit.training.progress import training_progress
from lorafit.training.records import adapter_record, add_general, run_summary, write_run_records
from lorafit.training.run_folder import input_fingerprints, metrics_line_count
from lorafit.training.run_state import RunProgress, RunResult
from lorafit.training.sharded_state import DEEPSPEED, FSDP, PLAIN, full_trainable_state, held_here, load_trainable_state
from lorafit.training.task_check import task_metric_check
from lorafit.training.trackers import RunTrackers, check_trackers_installed, open_trackers

EVA_INIT_BLOCKS = 64  # training blocks shown to the data-driven EVA init


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingRun:
    def __init__(
        self,
        config: RunConfig,
        folder: RunFolder,
        console: Console,
        stops: StopRequests,
        accelerator,
        engine: str = PLAIN,
    ):
        self.accelerator = accelerator  # engines.make_accelerator: one process, DDP, DeepSpeed or FSDP's processes
        self.engine = engine  # sharded_state.PLAIN, DEEPSPEED or FSDP, as launched
        self.config = config.model_copy(update={"out": str(folder.root)})
        self.folder, self.console, self.stops = folder, console, stops
        self.train_cfg = self.config.train
        self.progress = RunProgress()
        self.wall_start = time.perf_counter()
        self.startup_seconds: float | None = None
        self.trackers: RunTrackers | None = None

    # --- set-up ------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """Check and read every input, then load the model and build the objective and optimizer."""
        device = default_device()
        self.precision = resolve_precision(self.train_cfg.precision, device)
        self.device = self.accelerator.device
        self.autocast = functools.partial(autocast_context, self.precision, self.device)
        # The engine the Accelerator was made for (run_training read the launch once).
        self.deepspeed_run = self.engine == DEEPSPEED
        # ZeRO-3 and FSDP hold the weights themselves in parts: every forward is then a collective,
        # so every process measures and generates, and the weights are gathered before they are saved.
        self.partitioned_weights = weights_partitioned(self.accelerator, self.engine)
        if self.partitioned_weights:
            refuse_under_partitioned_weights(self.config, self.engine)
        self.scaler = None if self.deepspeed_run else loss_scaler(self.precision, self.device)
        check_trackers_installed(self.train_cfg.report_to)
        seed_everything(self.train_cfg.seed)
        # The first process prepares (and caches) the documents; the others then read its results.
        with self.accelerator.main_process_first():
            # The base model's answers (self-distillation, replay) are not generated with partitioned weights yet.
            self.inputs = prepare_run_inputs(
                self.config, self.folder, self.device, self.console, self.precision, not self.partitioned_weights
            )
        self.inputs.evaluation.autocast = self.autocast
        ref, train, processes = self.inputs.ref, self.train_cfg, self.accelerator.num_processes
        self.console.print(f"[bold]base[/] {ref.name}  [bold]precision[/] {self.precision}  [bold]device[/] {device}")
        self.console.print(
            f"[bold]data[/] {describe_data(self.inputs.blocks.stats, self.inputs.documents.formats)}; "
            f"{len(self.inputs.blocks.train)} blocks of {train.seq_len}"
        )
        self.console.print(
            f"[bold]batch[/] {train.micro_batch_size} blocks x {train.grad_accum} accumulation x {processes} "
            f"process(es) = {train.micro_batch_size * train.grad_accum * processes} blocks per step"
        )
        self._build_model()
        if self.partitioned_weights:
            held, whole = held_here(self.eval_objective)
            self.console.print(
                f"[bold]sharded[/] {PARTITIONED_NAMES[self.engine]}: this process holds {held:,} of the "
                f"{whole:,} parameters ({100 * held / max(whole, 1):.1f}%)"
            )
        self.base_record = BaseModelRecord(
            spec=ref.spec, name=ref.name, path=ref.path, weights_fingerprint=weights_fingerprint(ref)
        )
        blocks = self.inputs.blocks
        self.fingerprints = input_fingerprints(
            self.config, blocks.train, blocks.valid, self.base_record.weights_fingerprint
        )
        # One process shares measurements across runs (several would have to agree on reusing one).
        self.base_cache = (
            base_measurement_file(
                self.config, self.inputs.evaluation, self.base_record.weights_fingerprint, self.precision, self.device
            )
            if self.accelerator.num_processes == 1
            else None
        )
        self.checkpointer = Checkpointer(
            folder=self.folder,
            model=self.accelerator.unwrap_model(self.objective),
            optimizer=self.optimizer,
            train=self.train_cfg,
            fingerprints=self.fingerprints,
            log_metrics=self.log_metrics,
            warn=lambda message: self.console.print(f"[yellow]{escape(message)}[/]"),
            save_adapter_to=None if self.trainable.method == "full" else self._save_checkpoint_adapter,
            is_main_process=self.accelerator.is_main_process,
            scaler=self.scaler,
            world_size=self.accelerator.num_processes,
            engine=self.engine,
            barrier=self.accelerator.wait_for_everyone,
        )

    def _build_model(self) -> None:
        train, tensor = self.train_cfg, self.inputs.train_tensor
        self.trainable = prepare_trainable_model(
            self.config,
            self.inputs.ref,
            self.precision,
            self.device,
            init_batches=lambda: (
                tensor.batch(torch.arange(i, min(i + train.micro_batch_size, len(tensor))), self.device)
                for i in range(0, min(len(tensor), EVA_INIT_BLOCKS), train.micro_batch_size)
            ),
        )
        model, report = self.trainable.model, self.trainable.report
        self.console.print(
            f"[bold]{self.trainable.method}[/] {report.trainable:,} of {report.total:,} parameters trainable "
            f"({report.percent:.3f}%)  " + "  ".join(f"{name} {count:,}" for name, count in report.by_module.items())
        )
        self.console.print(f"gradient checkpointing {self.trainable.checkpointing.reason}")
        self.monitor, monitoring = make_monitor(model, train.monitor_every, self.engine, self.log_metrics, self._warn)
        if self.trainable.method == "lora":
            self.console.print(f"LoRA monitor {monitoring}")
        self.initial_adapter = None
        lora = self.trainable.method == "lora"
        if lora and changes_base_weights(self.config.lora) and self.accelerator.is_main_process:
            self.initial_adapter = save_initial_adapter(model, self.folder.initial_adapter)
        if train.neftune_alpha:
            add_embedding_noise(model, train.neftune_alpha)
        objective = CausalLMObjective(model, compute_dtype(self.precision), train.loss_chunk_tokens)

        def make_optimizer() -> torch.optim.Optimizer:
            groups = optimizer_groups(model, self.config.lora.plus_ratio if lora else 0.0)
            return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)

        self.objective, self.optimizer = prepare_for_engine(
            self.accelerator, self.engine, objective, make_optimizer, self.partitioned_weights
        )
        # Measurements run on the unwrapped module: a DDP module's forward is a collective (it
        # broadcasts buffers), which would hang when only the first process measures.
        self.eval_objective = self.accelerator.unwrap_model(self.objective)
        self.tuned_model = self.eval_objective.model
        self.task_metric = task_metric_check(
            self.tuned_model, self.inputs.evaluation, train.early_stopping_metric, train.early_stopping_examples
        )

    def _save_checkpoint_adapter(self, folder: Path, state: LoopState, weights: dict[str, torch.Tensor]) -> None:
        # One process and DDP save the module's own weights (the same values); ZeRO and FSDP the gathered ones.
        whole = model_weights(weights) if self.engine != PLAIN else None
        save_adapter(self.tuned_model, folder, {"step": state.step}, self.initial_adapter, whole)

    def log_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.folder.metrics, record)
            if self.trackers is not None:
                self.trackers.send(record)

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}")

    def close_trackers(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def _monitor_step(self, step: int) -> None:
        if self.monitor is not None and self.monitor.due(step):
            self.monitor.check(step)

    def validate(self, blocks=None) -> LossResult:
        """Validation loss on `blocks` (default: the periodic validations' capped blocks)."""
        blocks = self.inputs.capped_valid if blocks is None else blocks
        return evaluate_loss(self.eval_objective, blocks, self.train_cfg.micro_batch_size, self.device, self.autocast)

    # --- start or resume ---------------------------------------------------------------------------

    def start(self) -> None:
        """A new run: its config.yaml, then the base model measured as set up (base_stage.py),
        kept in base_outputs.json."""
        # Written once every input has been checked: a run that failed on bad input leaves no
        # config.yaml behind, so retrying into the same --out is not refused as "already a run".
        if self.accelerator.is_main_process:
            write_text_atomic(self.folder.config, config_to_yaml(self.config))
        faults.at_stage("base")
        base = reuse_base_measurement(self) or measure_base(self)
        if self.accelerator.is_main_process:
            write_json_atomic(self.folder.base_outputs, base.outputs)
        self._keep_base(base)

    def resume(self, resume: str, ignore_changes: bool) -> None:
        """Continue from checkpoint `resume`; the base's measurements come from the checkpoint and
        base_outputs.json (a run from an older lorafit has none: the tuned side only)."""
        resumed = self.checkpointer.resume(resume, ignore_changes)
        record = resumed.record
        before = LossResult(**record["before"])
        general = LossResult(**record["general_before"]) if record.get("general_before") else None
        outputs = read_json_file(self.folder.base_outputs) if self.folder.base_outputs.is_file() else None
        path, cost = self.base_record.path, base_cost(self)
        base = MeasuredModel.from_parts("base", "base", path, before, general, outputs, cost)
        self.progress = RunProgress(resumed.state, resumed.position, str(resumed.checkpoint))
        self._keep_base(base)
        self.console.print(f"resuming from {resumed.checkpoint} (step {resumed.state.step})")

    def _keep_base(self, base: MeasuredModel) -> None:
        self.progress.base = base
        domain, general = base.evaluation.domain, base.evaluation.general
        self.checkpointer.base_record = {
            "before": {"nll_sum": domain.nll_sum, "tokens": domain.tokens},
            "general_before": None if general is None else {"nll_sum": general.nll_sum, "tokens": general.tokens},
        }
        self.console.print(
            f"[bold]valid ppl before[/] {domain.perplexity:.3f}  (loss {domain.loss:.4f}, {domain.tokens:,} tokens)"
        )

    # --- train -------------------------------------------------------------------------------------

    def train(self) -> None:
        """The loop to train.max_steps, rolling back after runs of non-finite steps; a signal saves
        a checkpoint and stops with the command that continues exactly."""
        # Start-up: everything before the first step (inputs read, model loaded, base measured).
        self.startup_seconds = time.perf_counter() - self.wall_start
        self.console.print(f"start-up {self.startup_seconds:.1f} s")
        if self.accelerator.is_main_process and self.train_cfg.report_to:
            # Opened once start or resume has settled metrics.jsonl: a tracker gets what it has not seen.
            config = self.config.model_dump(mode="json")
            train = self.train_cfg
            self.trackers = open_trackers(train.report_to, train.tracker_project, self.folder, config, self._warn)
            self.console.print(f"[bold]trackers[/] {', '.join(self.train_cfg.report_to)}")
        deepspeed = self.objective if self.deepspeed_run else None  # accelerate returns the DeepSpeedEngine
        engine = LoopEngine(
            self.accelerator,
            self.objective,
            self.optimizer,
            self.inputs.train_tensor,
            self.autocast,
            self.scaler,
            deepspeed,
            fsdp=self.engine == FSDP,
        )
        progress = self.progress
        with self.stops.deferring() as stop_requested, training_progress(self.console) as bar:
            hooks = LoopHooks(
                self.validate,
                self.log_metrics,
                on_step_end=self.checkpointer.on_step_end,
                stop_requested=stop_requested,
                progress=bar,
                task_metric=self.task_metric,
                on_gradients=self._monitor_step,
            )
            while True:
                try:
                    progress.loop = train_loop(engine, self.train_cfg, hooks, progress.loop, progress.position)
                    break
                except UnstableTrainingError as unstable:
                    sources = self.inputs.batch_sources(unstable.blocks)
                    progress.loop, progress.position = self.checkpointer.roll_back(unstable, sources)
        state = progress.loop
        if state.interrupted_by:
            saved = self.checkpointer.saved_or_save(state, self.checkpointer.last_position)
            raise TrainingInterruptedError(
                f"Stopped by {stop_requested.signal_name} after step {state.step}; checkpoint {saved}. "
                f"Continue exactly with: lorafit train CONFIG --out {self.folder.root} --resume"
            )

    # --- finish ------------------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Choose the weights, measure, save and write the records; a signal in the middle keeps a
        checkpoint of the trained weights, so --resume only redoes this stage."""
        state = self.progress.loop
        # What a checkpoint needs if a signal comes before the run is saved (the weights are the model's).
        finished_state = copy.copy(state)
        finished_position = dict(self.checkpointer.last_position or self.progress.position or {})
        metrics_at_loop_end = metrics_line_count(self.folder.metrics)
        try:
            faults.at_stage("finish")
            result = self._finish(state)
            # The other processes wait for the first to save and measure: a launcher ends a run
            # whose processes leave at different times.
            self.accelerator.wait_for_everyone()
            return result
        except KeyboardInterrupt:
            # (Had the best weights already been restored, the checkpoint holds those; the result is the same.)
            saved = self.checkpointer.saved_or_save(finished_state, finished_position, metrics_at_loop_end)
            raise TrainingInterruptedError(
                f"Stopped by {self.stops.signal_name or 'SIGINT'} after training (step {state.step}), before the "
                f"run was saved and measured; checkpoint {saved}. Finish it with: lorafit train CONFIG --out "
                f"{self.folder.root} --resume"
            ) from None

    def _finish(self, state: LoopState) -> RunResult:
        after = self._choose_weights(state)
        base = self.progress.base
        summary = run_summary(
            state,
            base.evaluation.domain,
            after,
            self.inputs,
            self.trainable.method,
            self.trainable.report.as_dict(),
            {
                "resumed_from": self.progress.resumed_from,
                "precision": self.precision,
                "device": str(self.device),
                "rollbacks": self.checkpointer.rollbacks,
                "processes": self.accelerator.num_processes,
                "gradient_checkpointing": self.trainable.checkpointing.enabled,
                "startup_seconds": self.startup_seconds,
            },
        )
        # Whole weights for the save: ZeRO's fp32 masters, FSDP's shards gathered (every process).
        weights = model_weights(full_trainable_state(self.eval_objective)) if self.engine != PLAIN else None
        if not self.accelerator.is_main_process:
            if self.partitioned_weights:  # the first process's measurements need every process's part
                self._measure_trained(after, self.folder.adapter)
            return RunResult(self.folder.root, summary, main_process=False)
        saved = self._save(summary, weights)
        summary.saved_to, summary.saved_bytes = str(saved), folder_bytes(saved)
        tuned = self._measure_trained(after, saved)
        add_general(summary, base.evaluation.general, tuned.evaluation.general)
        measured = [base, tuned]
        # Where the adapter changed the model: the kept weights' ‖ΔW‖ / ‖W‖ by layer and module type.
        # (Not where the weights are partitioned over the processes: ZeRO-3 and FSDP.)
        lora_here = self.trainable.method == "lora" and not self.partitioned_weights
        changes = change_map(module_norms(self.tuned_model)) if lora_here else None
        write_run_records(
            self.folder, self.config, self.inputs, self.base_record, summary, measured, self.wall_start, changes
        )
        if self.trackers is not None:
            reported = self.folder.report_files() if self.config.eval.report else None
            self.trackers.finish_run(summary.to_json(), state.step, reported)
        return RunResult(self.folder.root, summary)

    def _choose_weights(self, state: LoopState) -> LossResult:
        """Validate the end on the periodic validations' blocks; keep an earlier step's weights if
        that validated better (early stopping, overfitting). Returns the loss on every block."""
        capped, full = self.inputs.capped_valid, self.inputs.evaluation.domain
        final = self.validate()
        metric = self.task_metric() if self.task_metric else None
        record_validation(state, self.eval_objective, final, 0, self.log_metrics, metric)
        restored = state.best_step != state.step and state.best_trainable is not None
        if restored:
            load_trainable_state(self.eval_objective, state.best_trainable)
            self.console.print(f"restored the best adapter from step {state.best_step}")
        state.best_trainable = None
        return final if not restored and len(capped) == len(full) else self.validate(full)

    def _save(self, summary: RunSummary, weights: dict[str, torch.Tensor] | None) -> Path:
        record = adapter_record(self.config, self.inputs, self.base_record, self.fingerprints, summary).to_json()
        if self.trainable.method == "full":
            return save_full_model(self.tuned_model, self.inputs.tokenizer, self.folder.model, record, weights)
        return save_adapter(self.tuned_model, self.folder.adapter, record, self.initial_adapter, weights)

    def _measure_trained(self, after: LossResult, saved: Path) -> MeasuredModel:
        method = self.trainable.method
        if self.inputs.evaluation.records:
            self.console.print(f"scoring the {method} model on {len(self.inputs.evaluation.records)} task records...")
        name = "adapter" if method == "lora" else "full fine-tune"
        model, objective, evaluation = self.tuned_model, self.eval_objective, self.inputs.evaluation
        return measure_model(model, objective, name, method, str(saved), evaluation, {}, None, after)


def model_weights(objective_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable weights named as in the model (the PEFT model's own state dict) rather than as in
    the objective around it (CausalLMObjective.model)."""
    return {name.removeprefix("model."): value for name, value in objective_weights.items()}

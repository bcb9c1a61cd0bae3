"""`lorafit train`: set up data, model and LoRA; measure, train, measure again; save and summarise."""

from __future__ import annotations

import copy
import logging
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from lorafit.adapters.save import folder_bytes, save_adapter, save_full_model, save_initial_adapter
from lorafit.compute.batches import BlockTensors
from lorafit.compute.objective import CausalLMObjective
from lorafit.compute.perplexity import LossResult, evaluate_loss
from lorafit.compute.precision import autocast_context, resolve_precision
from lorafit.config import RunConfig, config_to_yaml
from lorafit.data.chat_template import resolve_chat_template
from lorafit.data.datasets import load_eval_blocks, load_run_documents, pack_run_documents
from lorafit.data.documents import Problems, print_problems
from lorafit.errors import DataError, LorafitError, TrainingInterruptedError, UsageError
from lorafit.evaluate.compare import generation_prompts, generation_rows, model_outputs, task_report
from lorafit.evaluate.tasks import load_task_records
from lorafit.integrity import read_json_file
from lorafit.io import append_jsonl, write_json_atomic, write_text_atomic
from lorafit.model.load import (
    check_seq_len,
    load_model_config,
    load_tokenizer,
    resolve_base,
    tokenizer_identity,
    weights_fingerprint,
)
from lorafit.model.lora import changes_base_weights, optimizer_groups
from lorafit.model.prepare import prepare_trainable_model
from lorafit.model.quantize import check_quantization
from lorafit.outputs import output_folder
from lorafit.train import faults
from lorafit.train.checkpoint import (
    changed_fingerprints,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
    save_checkpoint,
)
from lorafit.train.guards import StopRequests
from lorafit.train.loop import LoopState, UnstableTrainingError, record_validation, restore_trainable, train_loop
from lorafit.train.progress import training_progress
from lorafit.train.report import write_run_report
from lorafit.train.run_folder import (
    REPREPARED,
    check_run_folder,
    claim_run_folder,
    input_fingerprints,
    keep_metrics_up_to,
    metrics_line_count,
)

log = logging.getLogger(__name__)

EVA_INIT_BLOCKS = 64  # training blocks shown to the data-driven EVA init


@dataclass
class RunResult:
    out_dir: Path
    summary: dict


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe_data(stats: dict, formats: dict[str, str]) -> str:
    parts = []
    if stats.get("train_documents"):
        parts.append(
            f"{stats['train_documents']} train / {stats['valid_documents']} valid documents "
            f"({stats['train_tokens']:,} / {stats['valid_tokens']:,} tokens)"
        )
    instructions = stats.get("instructions")
    if instructions:
        kinds = sorted({fmt for fmt in formats.values() if fmt != "text"})
        parts.append(
            f"{instructions['train_examples']} train / {instructions['valid_examples']} valid examples "
            f"({', '.join(kinds)}; {instructions['truncated_examples']} truncated; template: "
            f"{instructions['chat_template']})"
        )
    return "; ".join(parts)


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
    out_dir = Path(out_dir or config.out)
    check_run_folder(out_dir, overwrite, resuming=resume is not None)
    # A run refused on its inputs leaves nothing (the documents it prepared are made again by a retry).
    with output_folder(out_dir, "run", "lorafit train", disposable=REPREPARED), StopRequests(deferred=False) as stops:
        if not claim_run_folder(out_dir, resume, console):
            resume = None
        try:
            return _train(config, out_dir, console, resume, ignore_changes, stops)
        except KeyboardInterrupt:
            raise interrupted_at_once(out_dir, stops.signal_name or "SIGINT") from None


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


def _train(
    config: RunConfig, out_dir: Path, console: Console, resume: str | None, ignore_changes: bool, stops: StopRequests
) -> RunResult:
    from accelerate import Accelerator

    wall_start = time.perf_counter()
    config = config.model_copy(update={"out": str(out_dir)})
    train_cfg = config.train
    metrics_path = out_dir / "metrics.jsonl"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(train_cfg.precision, device)
    # lorafit applies autocast itself (train.precision); accelerate's own mixed-precision state is a
    # process-wide singleton that could not change between runs in one process (tests, notebooks).
    accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    device = accelerator.device

    def autocast():
        return autocast_context(precision, device)

    seed_everything(train_cfg.seed)

    check_quantization(config.model.quantization, device)  # before any work
    ref = resolve_base(config.model.base)
    check_seq_len(train_cfg.seq_len, load_model_config(ref))  # before any expensive work
    tokenizer = load_tokenizer(ref)
    console.print(f"[bold]base[/] {ref.name}  [bold]precision[/] {precision}  [bold]device[/] {device}")

    documents = load_run_documents(config.data, out_dir / "data")
    # Instruction data and task evaluation render prompts with one template, chosen (and checked) here.
    template = (
        resolve_chat_template(tokenizer, config.data.chat_template)
        if documents.instruction or documents.valid_conversations or config.eval.tasks
        else None
    )
    blocks = pack_run_documents(
        documents, tokenizer, train_cfg.seq_len, template, config.data.train_turns, config.data.instruct_share
    )
    print_problems(console, documents.problems.items, "summary.json")
    train_blocks, valid_blocks, data_stats = blocks.train, blocks.valid, blocks.stats
    console.print(
        f"[bold]data[/] {describe_data(data_stats, documents.formats)}; "
        f"{len(train_blocks)} blocks of {train_cfg.seq_len}"
    )

    task_problems = Problems()
    task_records = load_task_records(config.eval.tasks, config.data, task_problems) if config.eval.tasks else []
    if config.eval.task_max_examples:
        task_records = task_records[: config.eval.task_max_examples]
    if config.eval.tasks and not task_records:
        raise DataError(f"No usable task records in {', '.join(config.eval.tasks)}; check eval.tasks.")
    print_problems(console, task_problems.items, "tasks.json")
    general_blocks = (
        load_eval_blocks(config.eval.general, config.data, tokenizer, train_cfg.seq_len, template)
        if config.eval.general
        else None
    )

    train_tensor = BlockTensors.from_packed(train_blocks)
    trainable = prepare_trainable_model(
        config,
        ref,
        precision,
        device,
        init_batches=lambda: (
            train_tensor.batch(torch.arange(i, min(i + train_cfg.micro_batch_size, len(train_tensor))), device)
            for i in range(0, min(len(train_tensor), EVA_INIT_BLOCKS), train_cfg.micro_batch_size)
        ),
    )
    model, report = trainable.model, trainable.report
    console.print(
        f"[bold]{trainable.method}[/] {report.trainable:,} of {report.total:,} parameters trainable "
        f"({report.percent:.3f}%)  " + "  ".join(f"{name} {count:,}" for name, count in report.by_module.items())
    )
    initial_adapter = None
    if trainable.method == "lora" and changes_base_weights(config.lora) and accelerator.is_main_process:
        initial_adapter = save_initial_adapter(model, out_dir / "adapter-init")

    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    objective = CausalLMObjective(model, compute_dtype, train_cfg.loss_chunk_tokens)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.lora.plus_ratio if trainable.method == "lora" else 0.0),
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
    )
    objective, optimizer = accelerator.prepare(objective, optimizer)

    capped_valid = valid_blocks.head(train_cfg.eval_max_blocks)

    def validate(blocks=capped_valid) -> LossResult:
        return evaluate_loss(objective, blocks, train_cfg.micro_batch_size, device, autocast)

    capped_general = general_blocks.head(train_cfg.eval_max_blocks) if general_blocks is not None else None
    shown_prompts, fed_prompts = generation_prompts(config, documents, tokenizer, template)

    def outputs_now() -> dict:
        return model_outputs(tuned_model, tokenizer, template, fed_prompts, task_records, config.eval, device, autocast)

    def log_metrics(record: dict) -> None:
        if accelerator.is_main_process:
            append_jsonl(metrics_path, record)

    tuned_model = accelerator.unwrap_model(objective).model
    fingerprints = input_fingerprints(config, train_blocks, valid_blocks, weights_fingerprint(ref))
    state, position, resumed_from = None, None, None
    if resume is not None:
        checkpoint, checkpoint_files = find_checkpoint(
            out_dir, resume, warn=lambda m: console.print(f"[yellow]{escape(m)}[/]")
        )
        changes = changed_fingerprints(checkpoint_files.record.get("fingerprints", {}), fingerprints)
        if changes and not ignore_changes:
            raise UsageError(
                f"--resume {checkpoint}: the inputs changed since it was written ({'; '.join(changes)}); "
                "restore them, or pass --ignore-changes to resume anyway (the result is then not exact)."
            )
        state, record = load_checkpoint(checkpoint, accelerator.unwrap_model(objective), optimizer, checkpoint_files)
        position, resumed_from = record["position"], str(checkpoint)
        before = LossResult(**record["before"])
        general_before = LossResult(**record["general_before"]) if record.get("general_before") else None
        base_file = out_dir / "base_outputs.json"
        # Written before the first checkpoint; a run from an older lorafit has none: tuned side only.
        base_outputs = read_json_file(base_file) if base_file.is_file() else None
        keep_metrics_up_to(metrics_path, state.step, record.get("metrics_lines"))
        console.print(f"resuming from {checkpoint} (step {state.step})")
    else:
        # Written once every input has been checked: a run that failed on bad input leaves no
        # config.yaml behind, so retrying into the same --out is not refused as "already a run".
        write_text_atomic(out_dir / "config.yaml", config_to_yaml(config))
        console.print("measuring validation perplexity of the base model...")
        faults.at_stage("base")
        before = validate(valid_blocks)
        log_metrics({"step": 0, "valid_loss": round(before.loss, 6), "valid_ppl": round(before.perplexity, 4)})
        general_before = validate(capped_general) if capped_general is not None else None
        # The base model's answers, taken now: the set-up model still computes the base function.
        if task_records:
            console.print(f"scoring the base model on {len(task_records)} task records...")
        base_outputs = outputs_now()
        write_json_atomic(out_dir / "base_outputs.json", base_outputs)
    console.print(
        f"[bold]valid ppl before[/] {before.perplexity:.3f}  (loss {before.loss:.4f}, {before.tokens:,} tokens)"
    )

    def write_checkpoint(state: LoopState, position: dict, metrics_lines: int | None = None) -> Path | None:
        if not accelerator.is_main_process:
            return None
        return save_checkpoint(
            out_dir / "checkpoints",
            accelerator.unwrap_model(objective),
            optimizer,
            state,
            {
                "position": position,
                "fingerprints": fingerprints,
                "before": {"nll_sum": before.nll_sum, "tokens": before.tokens},
                "general_before": None
                if general_before is None
                else {"nll_sum": general_before.nll_sum, "tokens": general_before.tokens},
                "metrics_lines": metrics_line_count(metrics_path) if metrics_lines is None else metrics_lines,
            },
            save_adapter_to=None
            if trainable.method == "full"
            else lambda folder: save_adapter(tuned_model, folder, {"step": state.step}, initial_adapter),
            keep=train_cfg.keep_checkpoints,
        )

    last_position: dict = {}

    def on_step_end(state: LoopState, position: dict) -> None:
        last_position.update(position)
        finished = state.step >= train_cfg.max_steps or state.stopped_early
        # Never checkpoint in the middle of non-finite steps: a rollback must land on a good state.
        if train_cfg.save_every and (state.step % train_cfg.save_every == 0 or finished) and not state.bad_in_row:
            write_checkpoint(state, position)

    def batch_sources(block_ids: list[int]) -> str:
        docs = sorted({member for block in block_ids for member in train_blocks.members[block]})
        return ", ".join(blocks.sources[i] for i in docs[:5]) + (" ..." if len(docs) > 5 else "")

    rollbacks = 0
    with stops.deferring() as stop_requested, training_progress(console) as progress:
        while True:
            try:
                state = train_loop(
                    accelerator,
                    objective,
                    optimizer,
                    train_tensor,
                    train_cfg,
                    autocast,
                    validate,
                    log_metrics,
                    on_step_end,
                    progress,
                    state=state,
                    position=position,
                    stop_requested=stop_requested,
                )
                break
            except UnstableTrainingError as unstable:
                found = list_checkpoints(out_dir / "checkpoints")
                if not found or rollbacks >= train_cfg.max_rollbacks:
                    raise LorafitError(
                        f"Training is unstable: {train_cfg.max_bad_steps} steps in a row up to step {unstable.step} "
                        f"had a non-finite loss or gradient (last batch from: {batch_sources(unstable.blocks)}); "
                        f"last good checkpoint: {found[-1] if found else 'none (set train.save_every)'}; "
                        f"{rollbacks} rollback(s) tried. Lower train.lr, check those documents, or use "
                        "train.precision: fp32."
                    ) from None
                rollbacks += 1
                good, files = newest_readable(found, warn=lambda m: console.print(f"[yellow]{escape(m)}[/]"))
                state, record = load_checkpoint(good, accelerator.unwrap_model(objective), optimizer, files)
                position = record["position"]
                state.lr_scale *= train_cfg.rollback_lr_factor
                keep_metrics_up_to(metrics_path, state.step)
                log_metrics({"step": state.step, "event": "rollback", "lr_scale": state.lr_scale})
                console.print(
                    f"[yellow]non-finite loss up to step {unstable.step}: rolled back to {good}, "
                    f"learning rate x{state.lr_scale:g}[/]"
                )
    if state.interrupted_by:
        saved = out_dir / "checkpoints" / f"step-{state.step}"
        if not (saved / "state.json").is_file():
            saved = write_checkpoint(state, dict(last_position))
        raise TrainingInterruptedError(
            f"Stopped by {stop_requested.signal_name} after step {state.step}; checkpoint {saved}. "
            f"Continue exactly with: lorafit train CONFIG --out {out_dir} --resume"
        )
    # What a checkpoint needs if a signal comes before the run is saved (the weights are the model's).
    finished_state, finished_position = copy.copy(state), dict(last_position or position or {})
    metrics_at_loop_end = metrics_line_count(metrics_path)
    try:
        faults.at_stage("finish")
        # Choose the adapter on the same blocks as the periodic validations, then report on all of them.
        final = validate()
        record_validation(state, objective, final, 0, log_metrics)
        restored = state.best_step != state.step and state.best_trainable is not None
        if restored:
            # An earlier validation was better (early stopping or overfitting): keep those weights.
            restore_trainable(objective, state.best_trainable)
            console.print(f"restored the best adapter from step {state.best_step}")
        state.best_trainable = None
        after = final if not restored and len(capped_valid) == len(valid_blocks) else validate(valid_blocks)

        summary = {
            "resumed_from": resumed_from,
            "base_model": ref.name,
            "precision": precision,
            "device": str(device),
            "steps": state.step,
            "stopped_early": state.stopped_early,
            "best_step": state.best_step,
            "skipped_steps": state.skipped_steps,
            "rollbacks": rollbacks,
            "micro_batch_size": state.micro_batch_size,
            "grad_accum": state.grad_accum,
            "valid_loss_before": before.loss,
            "valid_loss_after": after.loss,
            "valid_ppl_before": before.perplexity,
            "valid_ppl_after": after.perplexity,
            "valid_ppl_change_percent": 100.0 * (after.perplexity / before.perplexity - 1.0),
            "train_tokens": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
            "method": trainable.method,
            "trainable_parameters": report.as_dict(),
            "data": data_stats,
            "data_problems": documents.problems.records(),
        }
        general_after = None
        if general_before is not None:
            general_after = validate(capped_general)
            summary.update(
                general_ppl_before=general_before.perplexity,
                general_ppl_after=general_after.perplexity,
                general_ppl_change_percent=100.0 * (general_after.perplexity / general_before.perplexity - 1.0),
            )
        if accelerator.is_main_process:
            metadata = {
                "base_model": {
                    "spec": ref.spec,
                    "name": ref.name,
                    "path": ref.path,
                    "weights_fingerprint": weights_fingerprint(ref),
                },
                "config": config.model_dump(mode="json"),
                "tokenizer": tokenizer_identity(tokenizer, ref),
                "chat_template": None if template is None else {"origin": template.origin, "text": template.text},
                "data": data_stats,
                # Hashes of the token blocks trained and validated on: the same data gives the same hashes.
                "data_hashes": {"train": fingerprints["train_data"], "valid": fingerprints["valid_data"]},
                "metrics": {k: summary[k] for k in ("valid_ppl_before", "valid_ppl_after", "steps", "train_tokens")},
            }
            if trainable.method == "full":
                saved = save_full_model(tuned_model, tokenizer, out_dir / "model", metadata)
            else:
                saved = save_adapter(tuned_model, out_dir / "adapter", metadata, initial_adapter)
            summary["saved_to"] = str(saved)
            summary["saved_bytes"] = folder_bytes(saved)
            if task_records:
                console.print(f"scoring the {trainable.method} model on {len(task_records)} task records...")
            tuned_outputs = outputs_now()
            summary["generations"] = generation_rows(shown_prompts, fed_prompts, base_outputs, tuned_outputs)
            if task_records:
                tasks = task_report(task_records, base_outputs, tuned_outputs, config.eval)
                tasks["skipped"] = [{"where": p.where, "message": p.message} for p in task_problems.items]
                write_json_atomic(out_dir / "tasks.json", tasks)
                summary["tasks"] = tasks["metrics"]
            summary["peak_rss_mb"] = peak_rss_mb()
            summary["wall_seconds"] = time.perf_counter() - wall_start
            write_json_atomic(out_dir / "summary.json", summary)
            if config.eval.report:
                write_run_report(
                    out_dir,
                    config,
                    summary,
                    measured={
                        "valid_before": before,
                        "valid_after": after,
                        "general_before": general_before,
                        "general_after": general_after,
                    },
                    outputs={"base": base_outputs, "tuned": tuned_outputs},
                    blocks={"valid": valid_blocks, "general": capped_general},
                    task_records=len(task_records),
                    prompts=shown_prompts,
                    base=metadata["base_model"],
                )
        return RunResult(out_dir=out_dir, summary=summary)
    except KeyboardInterrupt:
        # Trained but not yet saved or measured: keep it, so --resume only redoes the end. (Had the
        # best weights already been restored, the checkpoint holds those; the result is the same.)
        saved = out_dir / "checkpoints" / f"step-{state.step}"
        if not (saved / "state.json").is_file():
            saved = write_checkpoint(finished_state, finished_position, metrics_at_loop_end)
        raise TrainingInterruptedError(
            f"Stopped by {stops.signal_name or 'SIGINT'} after training (step {state.step}), before the run was "
            f"saved and measured; checkpoint {saved}. Finish it with: lorafit train CONFIG --out {out_dir} --resume"
        ) from None

"""What a finished run writes about itself: summary.json (`RunSummary`), the adapter's lorafit.json
(`AdapterRecord`), tasks.json (base and trained model's answers side by side) and the report."""

from __future__ import annotations

import time
from pathlib import Path

from lorafit.artifacts import AdapterRecord, BaseModelRecord, RunFolder, RunSummary
from lorafit.compute.perplexity import LossResult
from lorafit.config import EvalSection, RunConfig
from lorafit.data.datasets import validation_files
from lorafit.data.formats import Conversation
from lorafit.evaluation.core import MeasuredModel, evaluation_report, task_answer_rows
from lorafit.evaluation.report import (
    metric_changes,
    read_curves,
    read_lora_health,
    training_cost,
    transfer_summary,
    write_report,
)
from lorafit.io import write_json_atomic
from lorafit.model.device import peak_rss_mb
from lorafit.model.load import tokenizer_identity
from lorafit.training.inputs import RunInputs
from lorafit.training.loop import LoopState


def _change_percent(after: float, before: float) -> float:
    return 100.0 * (after / before - 1.0)


def run_summary(
    state: LoopState,
    before: LossResult,
    after: LossResult,
    inputs: RunInputs,
    method: str,
    parameters: dict,
    settings: dict,
) -> RunSummary:
    """summary.json's training figures; `settings`: resumed_from, precision, device, rollbacks, processes,
    gradient_checkpointing, startup_seconds."""
    return RunSummary(
        base_model=inputs.ref.name,
        steps=state.step,
        stopped_early=state.stopped_early,
        best_step=state.best_step,
        skipped_steps=state.skipped_steps,
        overflow_steps=state.overflow_steps,
        micro_batch_size=state.micro_batch_size,
        grad_accum=state.grad_accum,
        valid_loss_before=before.loss,
        valid_loss_after=after.loss,
        valid_ppl_before=before.perplexity,
        valid_ppl_after=after.perplexity,
        valid_ppl_change_percent=_change_percent(after.perplexity, before.perplexity),
        train_tokens=state.tokens_seen,
        train_seconds=state.train_seconds,
        tokens_per_second=state.tokens_seen / max(state.train_seconds, 1e-9),
        method=method,
        trainable_parameters=parameters,
        data=inputs.blocks.stats,
        data_problems=inputs.documents.problems.records(),
        **settings,
    )


def add_general(summary: RunSummary, before: LossResult | None, after: LossResult | None) -> None:
    if before is not None and after is not None:
        summary.general_ppl_before = before.perplexity
        summary.general_ppl_after = after.perplexity
        summary.general_ppl_change_percent = _change_percent(after.perplexity, before.perplexity)


def adapter_record(
    config: RunConfig, inputs: RunInputs, base: BaseModelRecord, fingerprints: dict, summary: RunSummary
) -> AdapterRecord:
    template = inputs.template
    return AdapterRecord(
        base_model=base,
        config=config.model_dump(mode="json"),
        tokenizer=tokenizer_identity(inputs.tokenizer, inputs.ref),
        chat_template=None if template is None else {"origin": template.origin, "text": template.text},
        data=inputs.blocks.stats,
        # Hashes of the token blocks trained and validated on: the same data gives the same hashes.
        data_hashes={"train": fingerprints["train_data"], "valid": fingerprints["valid_data"]},
        metrics={
            "valid_ppl_before": summary.valid_ppl_before,
            "valid_ppl_after": summary.valid_ppl_after,
            "steps": summary.steps,
            "train_tokens": summary.train_tokens,
        },
    )


def generation_rows(shown: list[str], fed: list[str], base: dict | None, tuned: dict) -> list[dict]:
    """summary.json's generations: [{prompt, rendered_prompt, base, adapter}] ('' where the base was
    not measured: a run resumed from an older lorafit's checkpoint)."""
    base_answers = (base or {}).get("generations") or [""] * len(tuned["generations"])
    return [
        {"prompt": question, "rendered_prompt": prompt, "base": b, "adapter": a}
        for question, prompt, b, a in zip(shown, fed, base_answers, tuned["generations"])
    ]


def task_table(
    records: list[Conversation], base: dict | None, tuned: dict, evaluation: EvalSection, skipped: list[dict] = ()
) -> dict:
    """A run's tasks.json: both sides' metrics and every answer side by side (keys base, adapter)."""
    rows = task_answer_rows(records, {"base": base, "adapter": tuned})
    return {
        "files": list(evaluation.tasks),
        "max_new_tokens": evaluation.task_max_new_tokens,
        "metrics": {
            "base": ((base or {}).get("tasks") or {}).get("metrics", {}),
            "adapter": tuned["tasks"]["metrics"],
        },
        # Each eval.tasks file scored on its own (the first: the training set's own test set).
        "sets": {
            "base": ((base or {}).get("tasks") or {}).get("sets", {}),
            "adapter": tuned["tasks"].get("sets", {}),
        },
        "answers": [{**{k: v for k, v in row.items() if k != "answers"}, **row["answers"]} for row in rows],
        "skipped": list(skipped),
    }


def run_transfer(task_files: list[str], sets: dict[str, dict]) -> dict | None:
    """summary.json's transfer (report.json's): the trained model's change on each eval.tasks file."""
    base = sets.get("base") or {}
    changes = {
        name: metric_changes(metrics, base[name]) for name, metrics in sets.get("adapter", {}).items() if name in base
    }
    return transfer_summary(list(task_files), {"adapter": changes})


def write_run_report(
    folder: RunFolder,
    config: RunConfig,
    summary: RunSummary,
    measured: list[MeasuredModel],
    inputs: RunInputs,
    base: BaseModelRecord,
    lora_health: dict | None = None,
) -> dict[str, Path]:
    """report.json/md/html of [base, trained model], the same report `lorafit eval` writes."""
    report = evaluation_report(
        measured,
        inputs.evaluation,
        base_model=base.to_json(),
        domain_files=validation_files(config.data),
        general_paths=list(config.eval.general),
        seq_len=config.train.seq_len,
    )
    report["settings"] = {"precision": summary.precision, "device": summary.device, "run": str(folder.root)}
    if lora_health:
        report["lora_health"] = lora_health
    return write_report(folder.root, report)


def write_run_records(
    folder: RunFolder,
    config: RunConfig,
    inputs: RunInputs,
    base_record: BaseModelRecord,
    summary: RunSummary,
    measured: list[MeasuredModel],
    wall_start: float,
    lora_changes: dict | None = None,
) -> None:
    """summary.json, tasks.json and the report, from the two measured sides [base, trained];
    `lora_changes` is the final adapter's change map (model/lora_norms.change_map) for the report."""
    base, tuned = measured
    # A run resumed from an older lorafit's checkpoint kept no base outputs: that side stays empty.
    evaluation, base_outputs = inputs.evaluation, base.outputs or None
    summary.generations = generation_rows(evaluation.shown_prompts, evaluation.fed_prompts, base_outputs, tuned.outputs)
    if evaluation.records:
        tasks = task_table(evaluation.records, base_outputs, tuned.outputs, config.eval, inputs.task_problems.records())
        write_json_atomic(folder.tasks, tasks)
        summary.tasks, summary.task_sets = tasks["metrics"], tasks["sets"]
        summary.transfer = run_transfer(config.eval.tasks, tasks["sets"])
    summary.peak_rss_mb = peak_rss_mb()
    summary.wall_seconds = time.perf_counter() - wall_start
    write_json_atomic(folder.summary, summary.to_json())
    if config.eval.report:
        tuned.evaluation.cost = training_cost(summary)
        tuned.evaluation.curves = read_curves(folder.metrics)
        health = read_lora_health(folder.metrics, lora_changes)
        write_run_report(folder, config, summary, measured, inputs, base_record, health)

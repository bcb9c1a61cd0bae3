"""The run's first stage after set-up: the base model measured as set up, or its measurement
by an earlier run on the same data and settings (training/base_cache.py)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from lorafit.compute.perplexity import LossResult
from lorafit.evaluation.core import MeasuredModel, measure_model
from lorafit.training.base_cache import keep_base_measurement, read_base_measurement

if TYPE_CHECKING:
    from lorafit.training.training_run import TrainingRun


def _log_base_validation(run: TrainingRun, before: LossResult) -> None:
    run.log_metrics({"step": 0, "valid_loss": round(before.loss, 6), "valid_ppl": round(before.perplexity, 4)})


def measure_base(run: TrainingRun) -> MeasuredModel:
    """The base model as set up: an adapter at its initialisation computes the base model's
    function; one started from a trained adapter (lora.init_from) is switched off."""
    run.console.print("measuring validation perplexity of the base model...")
    started_trained = bool(run.config.lora.init_from)
    evaluation = run.inputs.evaluation
    with run.tuned_model.disable_adapter() if started_trained else contextlib.nullcontext():
        before = run.validate(evaluation.domain)
        _log_base_validation(run, before)
        if evaluation.records:
            run.console.print(f"scoring the base model on {len(evaluation.records)} task records...")
        path, cost = run.base_record.path, base_cost(run)
        base = measure_model(run.tuned_model, run.eval_objective, "base", "base", path, evaluation, cost, None, before)
    if run.accelerator.is_main_process:
        keep_base_measurement(run.base_cache, before, base.evaluation.general, base.outputs)
    return base


def reuse_base_measurement(run: TrainingRun) -> MeasuredModel | None:
    """The base measured by an earlier run on the same data and settings, if there is one."""
    kept = read_base_measurement(run.base_cache)
    if kept is None:
        return None
    before, general, outputs = kept
    run.console.print(f"base model: measured by an earlier run on the same data and settings ({run.base_cache})")
    _log_base_validation(run, before)
    return MeasuredModel.from_parts("base", "base", run.base_record.path, before, general, outputs, base_cost(run))


def base_cost(run: TrainingRun) -> dict:
    return {"total_parameters": run.trainable.report.total}

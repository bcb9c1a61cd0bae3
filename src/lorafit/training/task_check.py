"""Early stopping on a task metric (`train.early_stopping_metric`): at every validation the model
answers the first `train.early_stopping_examples` records of each eval.tasks file, and the mean of
the chosen metric over the files decides which weights are kept. Validation loss on the training
set's own answers rewards copying their register; a held-out set in another style does not."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafit.compute.generate import generation_mode
from lorafit.evaluation.core import EvalInputs
from lorafit.evaluation.tasks import TaskSet, score_model

VALID_LOSS = "valid_loss"


def task_metric_check(
    model: torch.nn.Module, evaluation: EvalInputs, metric: str, examples: int
) -> Callable[[], tuple[str, float]] | None:
    """A function measuring (metric, mean over the task sets) now; None for `valid_loss`."""
    if metric == VALID_LOSS:
        return None
    sets = [TaskSet(task_set.name, task_set.records[:examples]) for task_set in evaluation.task_sets]

    def measure() -> tuple[str, float]:
        with generation_mode(model), torch.no_grad():
            scores = score_model(
                model,
                evaluation.tokenizer,
                evaluation.template,
                sets,
                evaluation.task_max_new_tokens,
                evaluation.generate_batch_size,
                evaluation.device,
                evaluation.autocast,
            )
        values = [scores.sets[task_set.name][metric] for task_set in sets if metric in scores.sets[task_set.name]]
        return metric, sum(values) / max(len(values), 1)

    return measure

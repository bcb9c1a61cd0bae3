"""The one evaluation both `lorafit eval` (the base and N adapters) and `lorafit train` (the base
before training, the trained model after) run: every model measured by `measure_model` on the same
`EvalInputs` — domain and general perplexity, greedy generations, task records — then one report
and one task-answer table from the list of measured models.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from rich.console import Console

from lorafit.compute.generate import default_prompt, generation_mode, greedy_generate
from lorafit.compute.perplexity import LossResult, evaluate_loss
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids, render_prompt
from lorafit.data.formats import Conversation
from lorafit.data.pack import PackedBlocks
from lorafit.evaluation.report import ModelEvaluation, blocks_info, build_report, general_files
from lorafit.evaluation.tasks import TaskSet, flat_records, score_model

PROMPTS_SHOWN = 3  # generations side by side when no prompts are given


@dataclass
class EvalInputs:
    """What every model is measured on, and how."""

    tokenizer: object
    template: ChatTemplate | None
    domain: PackedBlocks
    general: PackedBlocks | None
    task_sets: list[TaskSet]  # each eval.tasks entry's records: scored together and as a row each
    shown_prompts: list[str]  # as the reader sees them (the question)
    fed_prompts: list[str]  # as the model gets them (rendered through the chat template)
    device: torch.device
    autocast: Callable = nullcontext
    batch_size: int = 8  # perplexity blocks, unless loss_batch_size is set
    generate_batch_size: int = 32  # answers decoded together (task scoring, side-by-side generations)
    loss_batch_size: int | None = None  # a training run measures in its micro-batches
    max_new_tokens: int = 48
    task_max_new_tokens: int = 128

    @property
    def records(self) -> list[Conversation]:
        return flat_records(self.task_sets)

    @property
    def loss_batch(self) -> int:
        return self.loss_batch_size or self.batch_size


@dataclass
class MeasuredModel:
    """One model's figures (for the report) and its outputs (JSON-ready: generations and, with task
    records, {'metrics', 'answers', 'picks'})."""

    evaluation: ModelEvaluation
    outputs: dict = field(default_factory=dict)

    @classmethod
    def from_parts(
        cls, name: str, kind: str, path: str | None, domain, general, outputs: dict | None, cost: dict
    ) -> MeasuredModel:
        """A model measured earlier (a resumed run's base, read back from its files)."""
        outputs = outputs or {}
        evaluation = ModelEvaluation(
            name=name,
            kind=kind,
            path=path,
            domain=domain,
            general=general,
            tasks=(outputs.get("tasks") or {}).get("metrics", {}),
            task_sets=(outputs.get("tasks") or {}).get("sets", {}),
            generations=outputs.get("generations", []),
            cost=cost,
        )
        return cls(evaluation, outputs)


def model_outputs(model, inputs: EvalInputs) -> dict:
    """What one model says: {'generations': [...], 'tasks': {'metrics', 'answers', 'picks'}} (JSON-ready)."""
    with generation_mode(model):
        outputs: dict = {
            "generations": greedy_generate(
                model,
                inputs.tokenizer,
                inputs.fed_prompts,
                inputs.max_new_tokens,
                inputs.device,
                inputs.autocast,
                batch_size=inputs.generate_batch_size,
                stop_ids=end_of_turn_ids(inputs.tokenizer, inputs.template) if inputs.template else None,
            )
        }
        if inputs.records and inputs.template is not None:
            outputs["tasks"] = score_model(
                model,
                inputs.tokenizer,
                inputs.template,
                inputs.task_sets,
                inputs.task_max_new_tokens,
                inputs.generate_batch_size,
                inputs.device,
                inputs.autocast,
            ).to_json()
    return outputs


def measure_model(
    model,
    objective: torch.nn.Module,
    name: str,
    kind: str,
    path: str | None,
    inputs: EvalInputs,
    cost: dict,
    console: Console | None = None,
    domain_measured: LossResult | None = None,
) -> MeasuredModel:
    """Perplexity on the domain and general blocks (through `objective`, the model's summed loss),
    then generations and task answers. `domain_measured`: the domain loss when the caller has just
    measured it on these very blocks (training's final validation), so it is not measured twice."""
    if domain_measured is None:
        if console is not None:
            console.print(f"measuring [bold]{name}[/]: perplexity on {len(inputs.domain)} domain blocks...")
        started = time.perf_counter()
        domain = evaluate_loss(objective, inputs.domain, inputs.loss_batch, inputs.device, inputs.autocast)
        seconds = time.perf_counter() - started
        cost = {**cost, "eval_seconds": seconds, "eval_tokens_per_second": domain.tokens / max(seconds, 1e-9)}
    else:
        domain = domain_measured
    general = (
        evaluate_loss(objective, inputs.general, inputs.loss_batch, inputs.device, inputs.autocast)
        if inputs.general is not None
        else None
    )
    if inputs.records and console is not None:
        console.print(f"measuring [bold]{name}[/]: {len(inputs.records)} task records...")
    outputs = model_outputs(model, inputs)
    return MeasuredModel.from_parts(name, kind, path, domain, general, outputs, cost)


def choose_prompts(
    given: list[str],
    tokenizer,
    template: ChatTemplate | None,
    conversations: list[list[dict]],
    opening_text: str,
    sample_seed: int | None = None,
) -> tuple[list[str], list[str]]:
    """(shown, fed) prompts for the side-by-side generations. With a chat template (a model that
    answers questions) the given prompts, else questions of `conversations` (the first few, or a
    seeded sample), go through it, shown as the question; without one, the given prompts, else the
    opening of `opening_text`, are continued as raw text."""
    if template is None:
        prompts = list(given) or [default_prompt(opening_text)]
        return prompts, prompts
    if given:
        chats = [[{"role": "user", "content": prompt}] for prompt in given]
    elif conversations:
        picked = (
            conversations[:PROMPTS_SHOWN]
            if sample_seed is None
            else random.Random(sample_seed).sample(conversations, min(PROMPTS_SHOWN, len(conversations)))
        )
        chats = [m[:-1] if m[-1]["role"] == "assistant" else m for m in picked]
    else:
        opening = default_prompt(opening_text)
        return [opening], [opening]
    return [m[-1]["content"] for m in chats], [render_prompt(tokenizer, template, m) for m in chats]


def task_answer_rows(records: list[Conversation], sides: dict[str, dict | None]) -> list[dict]:
    """Every task record with every model's answer side by side: {source, prompt, reference,
    answers: {model name: answer}}. A side that was not measured (None) answers ''."""
    open_records = [r for r in records if r.choices is None]
    mc_records = [r for r in records if r.choices is not None]
    tasks = {name: (outputs or {}).get("tasks") for name, outputs in sides.items()}
    rows = [
        {
            "source": record.source,
            "prompt": record.messages[-2]["content"],
            "reference": record.messages[-1]["content"],
            "answers": {name: side["answers"][i] if side else "" for name, side in tasks.items()},
        }
        for i, record in enumerate(open_records)
    ]
    rows += [
        {
            "source": record.source,
            "prompt": record.messages[-1]["content"],
            "reference": record.choices[record.answer],
            "answers": {
                name: record.choices[side["picks"][i]] if side and side["picks"][i] is not None else ""
                for name, side in tasks.items()
            },
        }
        for i, record in enumerate(mc_records)
    ]
    return rows


def task_data(task_sets: list[TaskSet]) -> dict:
    """report.json's data.tasks: every file, the records scored, and each set (the first one the
    training set's own test set, the others transfer sets)."""
    return {
        "files": [task_set.name for task_set in task_sets],
        "records": sum(len(task_set.records) for task_set in task_sets),
        "sets": [{"name": task_set.name, "records": len(task_set.records)} for task_set in task_sets],
    }


def evaluation_report(
    measured: list[MeasuredModel],
    inputs: EvalInputs,
    base_model: dict,
    domain_files: list[str],
    general_paths: list[str],
    seq_len: int,
) -> dict:
    """report.json of `measured` (the base first) on `inputs`."""
    return build_report(
        [m.evaluation for m in measured],
        base_model=base_model,
        data={
            "domain": blocks_info(inputs.domain, domain_files, seq_len),
            "general": blocks_info(inputs.general, general_files(general_paths), seq_len),
            "tasks": task_data(inputs.task_sets) if inputs.task_sets else None,
        },
        prompts=inputs.shown_prompts,
    )

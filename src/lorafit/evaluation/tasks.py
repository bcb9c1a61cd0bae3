"""Task evaluation on instruction/QA test files, base vs adapter.

Open-ended records are answered greedily from the prompt rendered by the run's chat template and
scored against the reference answer (exact match, token F1, ROUGE-L, BLEU). Records that carry
`choices` and an `answer` are scored by the log-likelihood of each choice after the prompt; the
most likely choice counts as the model's pick (multiple-choice accuracy).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.compute.generate import greedy_generate
from lorafit.config import DataSection
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids, render_prompt
from lorafit.data.datasets import file_format
from lorafit.data.documents import Problems
from lorafit.data.formats import Conversation, field_names, read_conversations
from lorafit.data.readers import find_files
from lorafit.data.tokenize import pad_token_id
from lorafit.errors import DataError
from lorafit.evaluation.metrics import answer_metrics


def load_task_records(paths: list[str], data: DataSection, problems: Problems) -> list[Conversation]:
    """Test conversations from instruction files (alpaca, chat or ShareGPT; detected like training data)."""
    records: list[Conversation] = []
    fields = field_names(data.fields)
    data = data.model_copy(update={"format": "auto"})  # data.format describes the training files
    for path in find_files(paths):
        fmt = file_format(path, data)
        if fmt == "text":
            raise DataError(
                f"{path}: eval.tasks needs instruction records (alpaca, chat or ShareGPT) with reference answers, "
                "not plain text; use it as validation data instead."
            )
        records.extend(read_conversations([Path(path)], fmt, fields, problems))
    return records


@dataclass
class TaskSet:
    """The records of one eval.tasks / --tasks entry (a file, or a folder's files): scored as a row of
    its own, so a gain on the training set's own test set and a loss on another show apart."""

    name: str  # the entry as given
    records: list[Conversation]


def load_task_sets(
    paths: list[str], data: DataSection, problems: Problems, max_examples: int = 0, setting: str = "eval.tasks"
) -> list[TaskSet]:
    """One TaskSet per entry of `paths` (none without paths), each cut to its first `max_examples`
    records (0: all); an entry that holds no usable record is refused, naming `setting`."""
    sets = []
    for path in paths:
        if any(task_set.name == path for task_set in sets):
            raise DataError(f"{setting} names {path} twice; name each test set once.")
        records = load_task_records([path], data, problems)
        if max_examples:
            records = records[:max_examples]
        if not records:
            raise DataError(f"No usable task records in {path}; check {setting}.")
        sets.append(TaskSet(path, records))
    return sets


def flat_records(task_sets: list[TaskSet]) -> list[Conversation]:
    return [record for task_set in task_sets for record in task_set.records]


@torch.no_grad()
def choice_log_likelihoods(
    model, tokenizer, prompt: str, choices: list[str], device: torch.device, autocast=nullcontext
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt (choices batched together)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    choice_ids = [
        tokenizer(choice, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for choice in choices
    ]
    width = len(prompt_ids) + max(len(ids) for ids in choice_ids)
    pad_id = pad_token_id(tokenizer)
    # Right padding: causal attention keeps the padding out of every scored position.
    batch = torch.full((len(choices), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(choice_ids):
        batch[row, : len(prompt_ids) + len(ids)] = torch.as_tensor(prompt_ids + ids)
    with autocast():
        logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for row, ids in enumerate(choice_ids):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(ids), device=log_probs.device)
        targets = torch.as_tensor(ids, device=log_probs.device)
        scores.append(float(log_probs[row, positions, targets].sum()))
    return scores


@dataclass
class TaskScores:
    """One model's task results: pooled metrics, metrics per task set, the answers to the open
    records and the picks of the multiple-choice ones (each in record order)."""

    metrics: dict
    sets: dict[str, dict]
    answers: list[str]
    picks: list[int]

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "sets": self.sets, "answers": self.answers, "picks": self.picks}


def records_metrics(records: list[Conversation], results: list[str | int]) -> dict:
    """Metrics of `records` from each one's result: the answer (open records) or the picked choice."""
    open_pairs = [(r, a) for r, a in zip(records, results) if r.choices is None]
    mc_pairs = [(r, p) for r, p in zip(records, results) if r.choices is not None]
    metrics: dict = {}
    if open_pairs:
        metrics.update(answer_metrics([a for _, a in open_pairs], [r.messages[-1]["content"] for r, _ in open_pairs]))
    if mc_pairs:
        metrics["mc_accuracy"] = sum(p == r.answer for r, p in mc_pairs) / len(mc_pairs)
        metrics["mc_count"] = len(mc_pairs)
    return metrics


def score_model(
    model,
    tokenizer,
    template: ChatTemplate,
    task_sets: list[TaskSet],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast=nullcontext,
) -> TaskScores:
    """Every record of every set answered (open records, batched) or scored by choice likelihood."""
    records = flat_records(task_sets)
    open_records = [r for r in records if r.choices is None]
    mc_records = [r for r in records if r.choices is not None]
    prompts = [render_prompt(tokenizer, template, r.messages) for r in open_records]
    stops = end_of_turn_ids(tokenizer, template)
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, device, autocast, batch_size, stops)
    picks = []
    for record in mc_records:
        prompt = render_prompt(tokenizer, template, record.messages)
        scores = choice_log_likelihoods(model, tokenizer, prompt, record.choices, device, autocast)
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    open_results, mc_results = iter(answers), iter(picks)
    results = [next(open_results) if r.choices is None else next(mc_results) for r in records]
    sets, start = {}, 0
    for task_set in task_sets:
        end = start + len(task_set.records)
        sets[task_set.name] = records_metrics(task_set.records, results[start:end])
        start = end
    return TaskScores(records_metrics(records, results), sets, answers, picks)

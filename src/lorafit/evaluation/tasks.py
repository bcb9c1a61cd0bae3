"""Task evaluation on instruction/QA test files, base vs adapter.

Open-ended records are answered greedily from the prompt rendered by the run's chat template and
scored against the reference answer (exact match, token F1, ROUGE-L, BLEU). Records that carry
`choices` and an `answer` are scored by the log-likelihood of each choice after the prompt; the
most likely choice counts as the model's pick (multiple-choice accuracy).
"""

from __future__ import annotations

from contextlib import nullcontext
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


def load_task_set(
    paths: list[str], data: DataSection, problems: Problems, max_examples: int = 0, setting: str = "eval.tasks"
) -> list[Conversation]:
    """The task records of `paths` (none without paths), the first `max_examples` of them (0: all);
    files that hold no usable record are refused, naming `setting`."""
    if not paths:
        return []
    records = load_task_records(paths, data, problems)
    if max_examples:
        records = records[:max_examples]
    if not records:
        raise DataError(f"No usable task records in {', '.join(paths)}; check {setting}.")
    return records


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


def score_model(
    model,
    tokenizer,
    template: ChatTemplate,
    records: list[Conversation],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast=nullcontext,
) -> tuple[dict, list[str], list[int]]:
    """(metrics, generated answers for open records, picked choice for multiple-choice records)."""
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
    metrics: dict = {}
    if open_records:
        metrics.update(answer_metrics(answers, [r.messages[-1]["content"] for r in open_records]))
    if mc_records:
        metrics["mc_accuracy"] = sum(p == r.answer for p, r in zip(picks, mc_records)) / len(mc_records)
        metrics["mc_count"] = len(mc_records)
    return metrics, answers, picks

"""Base vs tuned model, side by side: greedy generations and task scores.

The base side is measured *before* training on the model as set up — an adapter at its
initialisation computes the base model's function (B = 0; PiSSA/OLoRA split the weights exactly),
and full fine-tuning has not moved a weight yet. That holds for every method, where disabling the
adapter afterwards would not (PiSSA leaves only the residual in the base weights).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lorafit.compute.generate import default_prompt, generation_mode, greedy_generate
from lorafit.config import EvalSection, RunConfig
from lorafit.data.chat_template import ChatTemplate, render_prompt
from lorafit.data.datasets import RunDocuments
from lorafit.data.formats import Conversation
from lorafit.evaluate.tasks import score_model


def model_outputs(
    model,
    tokenizer,
    template: ChatTemplate | None,
    prompts: list[str],
    records: list[Conversation],
    evaluation: EvalSection,
    device: torch.device,
    autocast=nullcontext,
) -> dict:
    """What one model says: {'generations': [...], 'tasks': {'metrics', 'answers', 'picks'}} (JSON-ready)."""
    with generation_mode(model):
        outputs: dict = {
            "generations": greedy_generate(model, tokenizer, prompts, evaluation.max_new_tokens, device, autocast)
        }
        if records and template is not None:
            metrics, answers, picks = score_model(
                model,
                tokenizer,
                template,
                records,
                evaluation.task_max_new_tokens,
                evaluation.batch_size,
                device,
                autocast,
            )
            outputs["tasks"] = {"metrics": metrics, "answers": answers, "picks": picks}
    return outputs


def generation_rows(shown: list[str], fed: list[str], base: dict | None, tuned: dict) -> list[dict]:
    """[{prompt, rendered_prompt, base, adapter}] for the summary and the console (base None: not measured)."""
    base = base or _unmeasured(tuned)
    return [
        {"prompt": question, "rendered_prompt": prompt, "base": b, "adapter": a}
        for question, prompt, b, a in zip(shown, fed, base["generations"], tuned["generations"])
    ]


def _unmeasured(tuned: dict) -> dict:
    """A stand-in base side (empty answers, no metrics) for runs whose base outputs were not kept."""
    side: dict = {"generations": [""] * len(tuned["generations"])}
    if "tasks" in tuned:
        side["tasks"] = {
            "metrics": {},
            "answers": [""] * len(tuned["tasks"]["answers"]),
            "picks": [None] * len(tuned["tasks"]["picks"]),
        }
    return side


def task_report(records: list[Conversation], base: dict | None, tuned: dict, evaluation: EvalSection) -> dict:
    """tasks.json: metrics of both sides and every answer side by side (base None: not measured)."""
    base = base or _unmeasured(tuned)
    open_records = [r for r in records if r.choices is None]
    mc_records = [r for r in records if r.choices is not None]
    rows = [
        {
            "source": record.source,
            "prompt": record.messages[-2]["content"],
            "reference": record.messages[-1]["content"],
            "base": b,
            "adapter": a,
        }
        for record, b, a in zip(open_records, base["tasks"]["answers"], tuned["tasks"]["answers"])
    ]
    rows += [
        {
            "source": record.source,
            "prompt": record.messages[-1]["content"],
            "reference": record.choices[record.answer],
            "base": "" if b is None else record.choices[b],
            "adapter": record.choices[a],
        }
        for record, b, a in zip(mc_records, base["tasks"]["picks"], tuned["tasks"]["picks"])
    ]
    return {
        "files": list(evaluation.tasks),
        "max_new_tokens": evaluation.task_max_new_tokens,
        "metrics": {"base": base["tasks"]["metrics"], "adapter": tuned["tasks"]["metrics"]},
        "answers": rows,
    }


def generation_prompts(
    config: RunConfig, documents: RunDocuments, tokenizer, template: ChatTemplate | None
) -> tuple[list[str], list[str]]:
    """(shown, fed) prompts for the side-by-side generations: instruction runs ask questions through
    the chat template (shown: the question); text runs continue the opening of a document."""
    if template is not None and (documents.instruction or not documents.valid):
        if config.eval.prompts:
            chats = [[{"role": "user", "content": prompt}] for prompt in config.eval.prompts]
        else:
            chats = [c.messages for c in (documents.valid_conversations or documents.train_conversations)[:3]]
        chats = [m[:-1] if m[-1]["role"] == "assistant" else m for m in chats]
        return [m[-1]["content"] for m in chats], [render_prompt(tokenizer, template, m) for m in chats]
    prompts = list(config.eval.prompts) or [default_prompt(documents.valid[0].text)]
    return prompts, prompts

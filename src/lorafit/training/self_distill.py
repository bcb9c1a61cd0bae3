"""Self-distillation of instruction targets (the SDFT idea, Yang et al. 2024): before training, the
base model rewrites each training answer in its own words, shown the reference answer, and the
adapter is trained on the rewrite. It then learns the domain's facts in the register the model
already answers in, instead of the training set's (a docstring's "Return True if ..."), so
questions phrased unlike the training set keep getting the model's full answers.

A rewrite that is unusable falls back to the reference answer: cut at the length limit (training
through EOS would teach stopping mid-sentence), empty, looping, or sharing too little with the
reference (the model ignored the facts it was shown)."""

from __future__ import annotations

from dataclasses import replace

from lorafit.data.formats import Conversation
from lorafit.evaluation.metrics import normalize_answer
from lorafit.training.base_answers import BaseAnswer, BaseAnswerer

# How the base model is asked for its own answer, shown the reference first (a small model asked to
# "rewrite" a text it has just read tends to copy it; asked to answer from an excerpt, it answers).
REWRITE_REQUEST = (
    "Here is an excerpt from the documentation:\n\n"
    "{reference}\n\n"
    "Using this excerpt, answer the following question in a few sentences of your own.\n\n"
    "{question}"
)
MIN_REFERENCE_RECALL = 0.2  # share of the reference's words the rewrite must contain
MAX_REPEATED_SHARE = 0.5  # of the rewrite's 4-grams that repeat an earlier one: a loop


def rewrite_conversation(messages: list[dict]) -> list[dict]:
    """The request that asks for the last assistant turn again, shown that turn as a reference."""
    *history, question, reference = messages
    request = REWRITE_REQUEST.format(question=question["content"], reference=reference["content"])
    return [*history, {"role": "user", "content": request}]


def why_unusable(answer: BaseAnswer, reference: str) -> str | None:
    """None for a usable rewrite, else the reason it falls back to the reference."""
    if not answer.finished:
        return "cut"
    words = normalize_answer(answer.text).split()
    if not words:
        return "empty"
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if grams and 1 - len(set(grams)) / len(grams) > MAX_REPEATED_SHARE:
        return "looping"
    expected = set(normalize_answer(reference).split())
    if expected and len(expected & set(words)) / len(expected) < MIN_REFERENCE_RECALL:
        return "off_reference"
    return None


def self_distill(
    conversations: list[Conversation], answerer: BaseAnswerer, max_new_tokens: int
) -> tuple[list[Conversation], dict]:
    """Each conversation with its last answer rewritten by the base model (or kept, when the
    rewrite is unusable); the statistics: rewritten, and kept by reason."""
    eligible = [i for i, c in enumerate(conversations) if c.choices is None and c.messages[-1]["role"] == "assistant"]
    requests = [rewrite_conversation(conversations[i].messages) for i in eligible]
    answers = answerer.answer(requests, max_new_tokens, "self-distillation")
    out = list(conversations)
    stats = {"rewritten": 0, "kept": {"cut": 0, "empty": 0, "looping": 0, "off_reference": 0}}
    for index, answer in zip(eligible, answers):
        messages = conversations[index].messages
        reason = why_unusable(answer, messages[-1]["content"])
        if reason:
            stats["kept"][reason] += 1
            continue
        stats["rewritten"] += 1
        out[index] = replace(conversations[index], messages=[*messages[:-1], {**messages[-1], "content": answer.text}])
    return out, stats

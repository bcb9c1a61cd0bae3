"""Conversations -> token ids and labels, with the loss on answers only.

Prompt pieces and answer pieces are tokenized separately, the way the model meets them: at
inference the prompt is tokenized alone and the answer is generated after it. Every system, user
and template token gets label -100. An answer is trained up to and including the EOS that ends
it (so the tuned model stops); template text after that EOS (a newline before the next turn) is
context, and an answer whose template has no EOS gets one appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorafit.data.chat_template import ChatTemplate, RenderError, conversation_segments
from lorafit.data.documents import Problems
from lorafit.data.formats import Conversation
from lorafit.data.pack import IGNORE_INDEX
from lorafit.data.tokenize import tokenize_cached


@dataclass
class Examples:
    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    sources: list[str]
    stats: dict = field(default_factory=dict)


def answer_labels(ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one answer piece: trained through its last EOS, an EOS appended if it has none."""
    ids = ids.astype(np.int64)
    eos_at = np.flatnonzero(ids == eos_id)
    if not len(eos_at):
        ids = np.append(ids, eos_id)
        return ids, ids.copy()
    labels = ids.copy()
    labels[eos_at[-1] + 1 :] = IGNORE_INDEX
    return ids, labels


def build_examples(
    conversations: list[Conversation],
    tokenizer,
    template: ChatTemplate,
    seq_len: int,
    train_turns: str = "all",
    problems: Problems | None = None,
) -> Examples:
    """Token ids and answer-only labels per conversation; longer than `seq_len` is truncated and counted."""
    problems = problems if problems is not None else Problems()
    pieces: list[list[tuple[str, bool]]] = []
    sources: list[str] = []
    for conversation in conversations:
        try:
            pieces.append(conversation_segments(tokenizer, template, conversation.messages, train_turns))
            sources.append(conversation.source)
        except RenderError as exc:
            problems.add(conversation.source, "invalid_record", f"the chat template refused it: {exc}")
    flat_texts = [text for segments in pieces for text, _ in segments]
    flat_ids = iter(tokenize_cached(flat_texts, tokenizer))
    eos_id = tokenizer.eos_token_id
    examples = Examples(input_ids=[], labels=[], sources=[])
    truncated = no_answer_left = 0
    for segments, source in zip(pieces, sources):
        ids_parts, label_parts = [], []
        for _, trained in segments:
            ids = next(flat_ids).astype(np.int64)
            if trained:
                ids, labels = answer_labels(ids, eos_id)
            else:
                labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
            ids_parts.append(ids)
            label_parts.append(labels)
        ids, labels = np.concatenate(ids_parts), np.concatenate(label_parts)
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
            if not (labels[1:] != IGNORE_INDEX).any():
                no_answer_left += 1
                problems.add(
                    source, "too_long", f"the prompt alone fills train.seq_len={seq_len}; raise it to train on this"
                )
                continue
        examples.input_ids.append(ids)
        examples.labels.append(labels)
        examples.sources.append(source)
    examples.stats = {
        "examples": len(examples.input_ids),
        "truncated_examples": truncated,
        "dropped_examples_prompt_too_long": no_answer_left,
        "tokens": int(sum(len(ids) for ids in examples.input_ids)),
        "answer_tokens": int(sum(int((labels != IGNORE_INDEX).sum()) for labels in examples.labels)),
    }
    return examples

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

from lorafit.data.chat_template import ChatTemplate, RenderError, conversation_segments, end_of_turn_ids
from lorafit.data.documents import Problems
from lorafit.data.formats import Conversation
from lorafit.data.pack import IGNORE_INDEX
from lorafit.data.tokenize import tokenize_cached, tokenize_continuations


@dataclass
class Examples:
    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    sources: list[str]
    stats: dict = field(default_factory=dict)


def answer_labels(ids: np.ndarray, stop_ids: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one answer piece: trained through the first stop token after the answer
    (the template's end of turn or EOS, see end_of_turn_ids), which is appended if there is none;
    what the template puts after it (Phi-3's EOS after `<|end|>`, a newline) is context."""
    stops = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    ids = ids.astype(np.int64)
    eos_at = np.flatnonzero(np.isin(ids, stops))
    if not len(eos_at):
        ids = np.append(ids, stops[0])
        return ids, ids.copy()
    labels = ids.copy()
    labels[eos_at[0] + 1 :] = IGNORE_INDEX
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
    # A conversation's first piece starts a text; every later one continues it (which matters
    # to SentencePiece tokenizers, see data.tokenize.continuation_prefix_ids).
    first_ids = iter(tokenize_cached([segments[0][0] for segments in pieces if segments], tokenizer))
    specials = tuple(tokenizer.all_special_tokens)
    later = [
        (text, previous[0].endswith(specials))
        for segments in pieces
        for previous, (text, _) in zip(segments, segments[1:])
    ]
    later_ids = iter(tokenize_continuations([t for t, _ in later], [s for _, s in later], tokenizer))
    stop_ids = end_of_turn_ids(tokenizer, template)
    examples = Examples(input_ids=[], labels=[], sources=[])
    truncated = no_answer_left = 0
    for segments, source in zip(pieces, sources):
        ids_parts, label_parts = [], []
        for number, (_, trained) in enumerate(segments):
            ids = next(later_ids if number else first_ids).astype(np.int64)
            if trained:
                ids, labels = answer_labels(ids, stop_ids)
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

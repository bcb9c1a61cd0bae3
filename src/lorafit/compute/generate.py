"""Greedy generation, batched, from already-rendered prompts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from lorafit.data.tokenize import pad_token_id


@contextmanager
def generation_mode(model) -> Iterator[None]:
    """Eval mode with the KV cache on; training mode and settings restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = old_cache
        model.train(was_training)


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
    autocast=nullcontext,
    batch_size: int = 16,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Greedy answers to already-rendered prompts, in order. Prompts are batched by length with left
    padding; each answer ends at the first of `stop_ids` (default: the tokenizer's EOS; for chat
    prompts, chat_template.end_of_turn_ids), not included, or after `max_new_tokens`."""
    pad_id = pad_token_id(tokenizer)
    stops = stop_ids or [tokenizer.eos_token_id]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            tokens = encoded[index]
            ids[row, width - len(tokens) :] = torch.as_tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        with autocast():
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stops,
            )
        for row, index in enumerate(chunk):
            new = until_stop(output[row, width:].tolist(), stops)
            answers[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


def until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token (all of them if none stops)."""
    for at, token in enumerate(tokens):
        if token in stops:
            return tokens[:at]
    return tokens


def default_prompt(text: str, words: int = 40) -> str:
    """The opening of a validation document: the models continue held-out domain text."""
    return " ".join(text.split(" ")[:words])

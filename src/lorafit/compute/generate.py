"""Greedy generation, batched, from already-rendered prompts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from lorafit.compute.continuous import ContinuousBatcher, Sequence, generate_all
from lorafit.compute.sampling import Sampling


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
    """Greedy answers to already-rendered prompts, in order, through continuous batching (the
    serving engine's): up to `batch_size` answers decode together and a finished one's row goes to
    the next prompt at once. Each answer ends at the first of `stop_ids` (default: the tokenizer's
    EOS; for chat prompts, chat_template.end_of_turn_ids), not included, or after `max_new_tokens`."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, device, autocast, batch_size, stop_ids)
    return [text for text, _ in answers]


def greedy_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
    autocast=nullcontext,
    batch_size: int = 16,
    stop_ids: list[int] | None = None,
) -> list[tuple[str, bool]]:
    """greedy_generate's answers with whether each ended at a stop id (False: cut at max_new_tokens)."""
    stops = tuple(stop_ids or [tokenizer.eos_token_id])
    batcher = ContinuousBatcher(model, device, max_batch=batch_size, autocast=autocast)
    sampling = Sampling(max_new_tokens, stop_ids=stops)
    sequences = [Sequence(tokenizer(p, add_special_tokens=False)["input_ids"], sampling) for p in prompts]
    generate_all(batcher, sequences)
    return [
        (
            tokenizer.decode(until_stop(s.generated, list(stops)), skip_special_tokens=True).strip(),
            s.finish_reason == "stop",
        )
        for s in sequences
    ]


def until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token (all of them if none stops)."""
    for at, token in enumerate(tokens):
        if token in stops:
            return tokens[:at]
    return tokens


def default_prompt(text: str, words: int = 40) -> str:
    """The opening of a validation document: the models continue held-out domain text."""
    return " ".join(text.split(" ")[:words])

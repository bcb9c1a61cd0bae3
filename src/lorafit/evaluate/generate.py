"""Greedy generations from the base model and the adapted model, side by side."""

from __future__ import annotations

from contextlib import nullcontext

import torch


@torch.no_grad()
def greedy_continuation(
    model, tokenizer, prompt: str, max_new_tokens: int, device: torch.device, autocast=nullcontext
) -> str:
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    with autocast():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def side_by_side(
    peft_model, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device, autocast=nullcontext
) -> list[dict]:
    """[{prompt, base, adapter}] — the base is the same weights with the adapter disabled."""
    was_training = peft_model.training
    peft_model.eval()
    peft_model.config.use_cache = True
    rows = []
    try:
        for prompt in prompts:
            with peft_model.disable_adapter():
                base = greedy_continuation(peft_model, tokenizer, prompt, max_new_tokens, device, autocast)
            adapted = greedy_continuation(peft_model, tokenizer, prompt, max_new_tokens, device, autocast)
            rows.append({"prompt": prompt, "base": base, "adapter": adapted})
    finally:
        peft_model.config.use_cache = False
        peft_model.train(was_training)
    return rows


def default_prompt(text: str, words: int = 40) -> str:
    """The opening of a validation document: the models continue held-out domain text."""
    return " ".join(text.split(" ")[:words])

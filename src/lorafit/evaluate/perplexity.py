"""Token-weighted validation loss and perplexity, batched and without gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LossResult:
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def _batches(blocks: list[np.ndarray], batch_size: int):
    """Equal-length blocks batched together; shorter tail blocks on their own."""
    by_length: dict[int, list[np.ndarray]] = {}
    for block in blocks:
        by_length.setdefault(len(block), []).append(block)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            yield torch.as_tensor(np.stack(group[start : start + batch_size]), dtype=torch.long)


@torch.no_grad()
def evaluate_loss(
    objective: torch.nn.Module, blocks: list[np.ndarray], batch_size: int, device: torch.device, autocast
) -> LossResult:
    """Mean next-token loss over all tokens of `blocks`; `objective` returns summed losses."""
    was_training = objective.training
    objective.eval()
    nll_sum, tokens = 0.0, 0
    try:
        for batch in _batches(blocks, batch_size):
            batch = batch.to(device)
            with autocast():
                nll_sum += float(objective(batch, batch))
            tokens += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        objective.train(was_training)
    return LossResult(nll_sum=nll_sum, tokens=tokens)

"""Token-weighted validation loss and perplexity, batched and without gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafit.compute.batches import BlockTensors
from lorafit.compute.loss import target_count
from lorafit.data.pack import PackedBlocks


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


@torch.no_grad()
def evaluate_loss(
    objective: torch.nn.Module, blocks: PackedBlocks, batch_size: int, device: torch.device, autocast
) -> LossResult:
    """Mean next-token loss over every target token of `blocks`; `objective` returns summed losses."""
    was_training = objective.training
    objective.eval()
    # Weights that require grad make no_grad bf16 matmuls on CPU ~40% slower (measured: 584 vs 950
    # tok/s forward for SmolLM2, 8 x 512): frozen for the evaluation, restored after.
    trainable = [p for p in objective.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    tensors = BlockTensors.from_packed(blocks)
    nll_sum, tokens = 0.0, 0
    try:
        for start in range(0, len(tensors), batch_size):
            batch = tensors.batch(torch.arange(start, min(start + batch_size, len(tensors))), device)
            with autocast():
                nll_sum += float(objective(**batch))
            tokens += target_count(batch["labels"])
    finally:
        for param in trainable:
            param.requires_grad_(True)
        objective.train(was_training)
    return LossResult(nll_sum=nll_sum, tokens=tokens)

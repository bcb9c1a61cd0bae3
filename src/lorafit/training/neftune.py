"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, which keeps an
instruction-tuned model from fitting the exact wording of its training answers. Off outside
training: measurements, generations and the saved adapter are untouched."""

from __future__ import annotations

import math

import torch


def add_embedding_noise(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add noise of scale alpha / sqrt(tokens x width) to the input embeddings in training mode
    (tokens: the block's length, so packed examples share one scale)."""

    def noisy(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy)

"""LoRA dropout with a cheaper mask on CPUs.

`bernoulli_` draws a mask at ~5 ns per element on this CPU (6.4 ms for one 2048 x 576 LoRA input),
and PEFT draws one per adapted layer per step: 0.4 s of a 6 s step for q,v LoRA. Comparing 16-bit
random integers against a threshold gives the same Bernoulli(1 - p) mask, with p rounded to a
multiple of 1/32768, in 2.8 ms.
"""

from __future__ import annotations

import torch

_RANGE = 32768  # int16.random_() draws uniformly from [0, 2**15)


class Int16MaskDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * _RANGE)
        self.p = self.threshold / _RANGE
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        keep = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_() >= self.threshold
        return (x * keep).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p:.5f}"


def use_int16_mask_dropout(model: torch.nn.Module) -> int:
    """Replace PEFT's LoRA dropout modules in place; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = Int16MaskDropout(dropout.p)
                    replaced += 1
    return replaced

"""Learning rate as a pure function of the step: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_steps_for(max_steps: int, warmup_steps: int) -> int:
    """-1 means 5% of the run (at least one step when the run has more than one)."""
    if warmup_steps >= 0:
        return min(warmup_steps, max_steps)
    return max(1, round(0.05 * max_steps)) if max_steps > 1 else 0


def learning_rate(step: int, max_steps: int, peak_lr: float, warmup: int, min_lr_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): ramps to `peak_lr` over `warmup` steps, then
    follows a half cosine down to `peak_lr * min_lr_ratio` at the last step."""
    min_lr = peak_lr * min_lr_ratio
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_steps = max(max_steps - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

"""Whether a run recomputes activations (gradient checkpointing): on, off, or `auto`.

Checkpointing trades compute for memory: each layer's forward runs twice, which on this 2-core CPU
costs 14-25% of the throughput (bench/long_context.py: 328 -> 264 tokens/s at 4 x 512) and saves
the activations a micro-batch keeps for backward (2.7 -> 1.3 GB peak RSS there). With
attention memory linear in the sequence length, those activations are what grows with long
sequences: ~23 KB per token and layer for SmolLM2 in bf16, 5.6 GB for one 8,192-token block. So
`auto` turns it on only where they would crowd the memory at hand: when a micro-batch's estimated
activations exceed half the memory available at start-up (the rest is for the weights, the
optimizer, evaluation and whatever else the machine runs). Elsewhere it never pays: on this 24 GB
machine a whole 8,192-token block trains without it (7.9 GB peak RSS) 30% faster than with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Share of the available memory a micro-batch's activations may take before `auto` recomputes them.
ACTIVATION_SHARE = 0.5


@dataclass(frozen=True)
class CheckpointingChoice:
    enabled: bool
    reason: str  # one line for the run's header


def activation_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Estimated bytes a decoder-only transformer keeps for backward over `tokens` tokens.

    Per token and layer, in the compute dtype: about twelve hidden-sized tensors (norms, q/k/v and
    their rotated copies, attention output, residuals, LoRA inputs) and four intermediate-sized ones
    (gate, up, activation, product). Measured against SmolLM2 (576 / 1,536): 23.4 KB estimated
    26.1 KB."""
    hidden = int(model_config.hidden_size)
    intermediate = int(getattr(model_config, "intermediate_size", None) or 4 * hidden)
    layers = int(model_config.num_hidden_layers)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return tokens * layers * (12 * hidden + 4 * intermediate) * itemsize


def available_memory(device: torch.device) -> int | None:
    """Free memory of the device that holds activations: the GPU's, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def choose_checkpointing(
    setting: bool | str, model_config, tokens: int, dtype: torch.dtype, device: torch.device
) -> CheckpointingChoice:
    """train.gradient_checkpointing as it applies to a micro-batch of `tokens` tokens."""
    if setting is not None and setting != "auto":
        return CheckpointingChoice(bool(setting), "on (train.gradient_checkpointing)" if setting else "off")
    needed = activation_bytes(model_config, tokens, dtype)
    free = available_memory(device)
    gib = 2**30
    if free is None:
        return CheckpointingChoice(False, "off (auto: available memory unknown)")
    within = needed <= ACTIVATION_SHARE * free
    return CheckpointingChoice(
        not within,
        f"{'off' if within else 'on'} (auto: activations of a micro-batch ~{needed / gib:.1f} GiB "
        f"{'within' if within else 'over'} {ACTIVATION_SHARE:.0%} of {free / gib:.1f} GiB available)",
    )

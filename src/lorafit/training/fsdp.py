"""Sharding the objective with PyTorch FSDP2 (`fully_shard`) for `--distributed fsdp`.

lorafit applies torch's FSDP2 itself rather than through `accelerator.prepare`: accelerate runs FSDP
only on accelerators (a CPU run is plain MULTI_CPU there, so it could never be tested on a machine
without a GPU), and its automatic wrapping knows transformers models, not the objective module
around one. The units follow PEFT's FSDP wrapping policy, so frozen and LoRA weights are wrapped
apart: every LoRA matrix is a unit of its own, every decoder layer one; the input embedding is one
and the final norm with the output layer (with the embedding too when they are tied) the last,
kept gathered after its forward so that the fused loss reads the output weight whole. The objective
is the root. One code path on a CPU (gloo) and on GPUs (NCCL).
"""

from __future__ import annotations

import logging
import os

import torch

from lorafit.compute.objective import causal_lm_of
from lorafit.errors import UsageError

log = logging.getLogger(__name__)


def fsdp_options(device: torch.device) -> dict:
    """fully_shard's arguments: a 1-D mesh over every process, and what `accelerate launch` was told
    (--fsdp_offload_params, --fsdp_reshard_after_forward, or the same keys of its config file)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if os.environ.get("FSDP_VERSION", "2") == "1":
        log.warning("fsdp_version 1 in the accelerate config: lorafit shards with FSDP2 (fully_shard) all the same")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")
    return {
        "mesh": mesh,
        "reshard_after_forward": reshard,
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }


def shard_objective(objective: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard `objective` (a CausalLMObjective around a PEFT model) in place; returns it."""
    from peft.utils.other import fsdp_auto_wrap_policy

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # FSDP2 is public from torch 2.6 on
        raise UsageError(
            f"--distributed fsdp: this torch ({torch.__version__}) has no FSDP2 (fully_shard, torch 2.6 and "
            "later); install torch==2.13.0 or use --distributed deepspeed-zero3."
        ) from None

    options = fsdp_options(device)
    objective.to(device)
    policy = fsdp_auto_wrap_policy(objective.model)
    # Children before parents (FSDP2 shards bottom-up): the reverse of the depth-first module order.
    for module in reversed(list(objective.model.modules())):
        if module is not objective.model and policy(module=module, recurse=False, nonwrapped_numel=0):
            fully_shard(module, **options)

    causal_lm = causal_lm_of(objective.model)
    embed, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    norm = getattr(getattr(causal_lm, "model", None), "norm", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if embed is not None and not tied and not isinstance(embed, FSDPModule):
        fully_shard(embed, **options)
    # The last unit stays gathered from the norm's forward to the end of the backward: the fused
    # loss multiplies by the output weight outside the output layer's own forward.
    last = (embed, norm, head) if tied else (norm, head)
    tail = [m for m in last if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**options, "reshard_after_forward": False})
    fully_shard(objective, **options)
    return objective

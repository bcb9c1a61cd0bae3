"""The trainable weights and the optimizer state read and written whole, whatever engine holds them
in parts: DeepSpeed ZeRO (its fp32 master copies, partitioned across ranks; under ZeRO-3 the
weights themselves), FSDP2 (every parameter a DTensor shard), or one process and DDP (as they are).

Reading is a collective under ZeRO and FSDP: every process calls these functions at the same point,
in the same order, and the first process writes what they return. The engine's own way is used each
time (DeepSpeed's safe_get/set_full_fp32_param and GatheredParameters, torch's DTensor and
distributed-checkpoint state dicts), never a copy of their internals.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# The engines a run trains under (training.engines.launched_engine).
PLAIN, DEEPSPEED, FSDP = "plain", "deepspeed", "fsdp"


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The parameter's shape as the model defines it (ZeRO-3 keeps an empty placeholder in its place)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())


def held_here(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model): ZeRO-3 and FSDP keep a part each."""
    held = whole = 0
    for param in model.parameters():
        whole += full_numel(param)
        if isinstance(param, DTensor):
            held += param.to_local().numel()
        elif hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False):
            held += param.ds_tensor.numel()
        else:  # whole here: unpartitioned, or a small tensor ZeRO-3 keeps whole on every rank
            held += full_numel(param)
    return held, whole


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, by name, as copies: under DeepSpeed its fp32 master (exact
    even when the module computes in bf16/fp16), under FSDP its shards gathered."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            state[name] = _full_value(param).detach().clone()
    return state


def _full_value(param: torch.nn.Parameter) -> torch.Tensor:
    if isinstance(param, DTensor):
        return param.full_tensor()
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master.view(full_shape(param))
    return param


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the parameters named in `state` to its (whole) values, in the module and, under
    DeepSpeed, in its fp32 master copies; every process passes the same `state`."""
    partitioned = []  # ZeRO-3's: set inside one gathering, below
    for name, param in model.named_parameters():
        if name not in state:
            continue
        value = state[name]
        if isinstance(param, DTensor):
            # Each rank keeps its own shard of the whole value (no communication: all have it).
            shard = distribute_tensor(
                value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
            )
            param.copy_(shard)
        elif hasattr(param, "ds_id"):
            partitioned.append((param, value))
        else:
            param.copy_(value)
            _set_master(param, value)
    if partitioned:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([param for param, _ in partitioned], modifier_rank=0):
            for param, value in partitioned:
                param.data.copy_(value.view(param.ds_shape))
        for param, value in partitioned:
            _set_master(param, value)


def _set_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    if param.requires_grad and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float().to(param.device))


def optimizer_state(engine: str, model: torch.nn.Module, optimizer) -> dict | list:
    """What a checkpoint keeps of the optimizer: the state dict in one process and DDP; under ZeRO a
    list of every rank's partition (gathered to every process); under FSDP the whole state by
    parameter name (LoRA's is small; FSDP's own distributed-checkpoint format, gathered)."""
    if engine == DEEPSPEED:
        from accelerate.utils import gather_object

        return gather_object([optimizer.state_dict()])
    if engine == FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    return optimizer.state_dict()


def load_optimizer_state(engine: str, model: torch.nn.Module, optimizer, saved: dict | list) -> None:
    """Restore what optimizer_state returned (every process passes the same `saved`)."""
    if engine == DEEPSPEED:
        if not isinstance(saved, list):
            raise ValueError("a DeepSpeed run's checkpoint holds one optimizer partition per rank")
        # DeepSpeed's optimizer takes the list and its rank's part, with the fp32 master weights as saved.
        getattr(optimizer, "optimizer", optimizer).load_state_dict(saved, load_from_fp32_weights=True)
    elif engine == FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)

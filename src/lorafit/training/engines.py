"""The distributed engine a launched run trains under. DDP needs nothing here; DeepSpeed (started
by `accelerate launch --use_deepspeed`, whose flags or config file choose the ZeRO stage and the
offloads) gets the settings lorafit's loop owns: the micro-batch, the accumulation, clipping and
the precision, so one lorafit config means the same run under every engine. FSDP (`accelerate
launch --use_fsdp`) is applied by lorafit with torch's fully_shard (training/fsdp.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager

from lorafit.compute.objective import causal_lm_of
from lorafit.config import RunConfig, TrainSection
from lorafit.errors import UsageError
from lorafit.model.lora import changes_base_weights
from lorafit.training.fsdp import shard_objective
from lorafit.training.sharded_state import DEEPSPEED, FSDP, PLAIN

# The engines that hold the weights themselves in parts, as messages name them.
PARTITIONED_NAMES = {FSDP: "FSDP", DEEPSPEED: "DeepSpeed ZeRO-3"}

# What accelerate's mixed-precision argument must say for a resolved train.precision.
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def launched_engine() -> str:
    """DEEPSPEED or FSDP in a process that `accelerate launch --use_deepspeed` / `--use_fsdp` (or
    their config files) started; PLAIN in one process or under DDP."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DEEPSPEED
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP
    return PLAIN


def make_accelerator(train: TrainSection, precision: str, device_type: str, engine: str = PLAIN):
    """The run's Accelerator: one process, DDP (gloo on a CPU, NCCL on GPUs) or DeepSpeed, as launched.

    lorafit applies autocast itself (train.precision): accelerate's own mixed-precision state is a
    process-wide singleton that could not change between runs in one process (tests, notebooks).
    Under DeepSpeed (always a launched process of its own) the engine casts and scales itself, and
    accelerate is not told `cpu` (it would skip DeepSpeed; DS_ACCELERATOR=cpu serves a CPU)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if engine == FSDP:
        # The processes and their collectives only: lorafit shards the model itself (training/fsdp.py),
        # so accelerate must not take the run for its own FSDP and prepare the model a second time.
        with _without_env("ACCELERATE_USE_FSDP"):
            return Accelerator(mixed_precision="no", cpu=device_type == "cpu")
    if engine != DEEPSPEED:
        return Accelerator(mixed_precision="no", cpu=device_type == "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plugin = deepspeed_plugin(train, precision, world_size)
    # Without a GPU accelerate finds no backend of its own and would take the run for one process.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if device_type == "cpu" else []
    return Accelerator(
        mixed_precision=MIXED_PRECISION[precision], cpu=False, deepspeed_plugin=plugin, kwargs_handlers=handlers
    )


def deepspeed_plugin(train: TrainSection, precision: str, world_size: int):
    """accelerate's DeepSpeedPlugin as launched (ZeRO stage, offload), with lorafit's batch,
    accumulation, clipping and precision filled in."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train.max_grad_norm
    # The loop's AdamW (with LoRA+'s groups) is the client optimizer DeepSpeed partitions.
    config["zero_allow_untested_optimizer"] = True
    # A step whose gradients hold inf/NaN is skipped by DeepSpeed itself in bf16 and fp16 (fp16 with
    # its dynamic loss scale); in fp32 it checks nothing and lorafit's rollback takes over.
    config["bf16"] = {"enabled": precision == "bf16", "check_grad_overflow": True}
    config["fp16"] = {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    plugin.gradient_accumulation_steps = train.grad_accum
    return plugin


def weights_partitioned(accelerator, engine: str) -> bool:
    """True under FSDP and ZeRO-3, where each process holds only part of the weights."""
    return engine == FSDP or (engine == DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)


def refuse_under_partitioned_weights(config: RunConfig, engine: str) -> None:
    """What this lorafit does not run yet where the engine holds the weights in parts."""
    lora, reasons = config.lora, []
    if config.train.method == "full":
        reasons.append("train.method: full (use lora, or deepspeed-zero2 / ddp)")
    if changes_base_weights(lora) or lora.init.startswith(("eva", "loftq")):
        reasons.append(f"lora.init: {lora.init} (its set-up reads the whole base; use default or gaussian)")
    if config.model.quantization != "none":
        reasons.append(f"model.quantization: {config.model.quantization} (use ddp for a quantized base)")
    data = config.data
    if data.self_distill is True or data.replay_share_for(False) > 0:  # asked for by name ('auto' turns off)
        reasons.append("data.self_distill / data.replay_share (the base model's answers: use ddp or deepspeed-zero2)")
    if config.train.early_stopping_metric != "valid_loss":
        reasons.append(f"train.early_stopping_metric: {config.train.early_stopping_metric} (use valid_loss)")
    if reasons:
        raise UsageError(f"Under {PARTITIONED_NAMES[engine]} this lorafit does not run {'; '.join(reasons)}.")


def prepare_for_engine(accelerator, engine: str, objective, make_optimizer, partitioned: bool) -> tuple:
    """The objective and its optimizer as the engine trains them: accelerate prepares them for one
    process, DDP and DeepSpeed; under FSDP lorafit shards the objective before the optimizer is made
    (the optimizer must take the shards)."""
    if engine == FSDP:
        objective = shard_objective(objective, accelerator.device)
        return objective, make_optimizer()
    prepared, optimizer = accelerator.prepare(objective, make_optimizer())
    if engine == DEEPSPEED and partitioned:
        from deepspeed.runtime.zero import register_external_parameter

        # The fused loss multiplies by the output weight outside the output layer's forward:
        # ZeRO-3 gathers it for the objective's whole forward.
        head = causal_lm_of(objective.model).get_output_embeddings()
        register_external_parameter(accelerator.unwrap_model(prepared), head.weight)
    return prepared, optimizer


@contextmanager
def _without_env(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved

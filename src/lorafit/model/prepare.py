"""The model a run trains: the base loaded (quantized if asked), fast kernels switched on, and
either a LoRA adapter on top (train.method: lora) or every weight trainable (train.method: full)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lorafit.config import RunConfig
from lorafit.model.attention import use_block_causal_attention, use_cuda_attention
from lorafit.model.checkpointing import CheckpointingChoice, choose_checkpointing
from lorafit.model.device import compute_dtype
from lorafit.model.dropout import use_int16_mask_dropout
from lorafit.model.load import BaseModelRef, load_causal_lm
from lorafit.model.lora import ParameterReport, apply_lora, parameter_report, start_from_adapter
from lorafit.model.quantize import bitsandbytes_config, prepare_quantized


@dataclass
class TrainableModel:
    model: torch.nn.Module  # a PeftModel (lora) or the causal LM itself (full)
    method: str
    report: ParameterReport
    checkpointing: CheckpointingChoice


def prepare_trainable_model(
    config: RunConfig,
    ref: BaseModelRef,
    precision: str,
    device: torch.device,
    init_batches: Callable[[], Iterable[dict]] | None = None,
) -> TrainableModel:
    """Load and set up the model; `init_batches` supplies training batches to data-driven inits (EVA)."""
    full = config.train.method == "full"
    dtype = compute_dtype(precision)
    quantization = bitsandbytes_config(config.model.quantization, dtype)
    # Full fine-tuning keeps fp32 master weights (bf16 AdamW updates would round away); LoRA stores
    # the frozen base in the compute dtype and keeps only the small adapter in fp32.
    model = load_causal_lm(ref, torch.float32 if full else dtype, quantization)
    checkpointing = choose_checkpointing(
        config.train.gradient_checkpointing,
        model.config,
        config.train.seq_len * config.train.micro_batch_size,
        dtype,
        device,
    )
    if device.type == "cpu" and precision == "bf16":
        use_block_causal_attention(model)
    elif device.type == "cuda":
        use_cuda_attention(model, half_precision=precision in ("bf16", "fp16"))
    if quantization is not None:
        model = prepare_quantized(model, checkpointing.enabled)
    if full:
        model.requires_grad_(True)
    else:
        model = apply_lora(
            model,
            config.lora,
            under_autocast=precision in ("bf16", "fp16") and quantization is None,
            init_batches=init_batches() if config.lora.init == "eva" and init_batches else None,
            weights_path=ref.path,
        )
        if config.lora.init_from:
            start_from_adapter(model, config.lora.init_from)
        if device.type == "cpu":
            use_int16_mask_dropout(model)
    if checkpointing.enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not full:
            model.enable_input_require_grads()
    return TrainableModel(
        model=model, method=config.train.method, report=parameter_report(model), checkpointing=checkpointing
    )

"""Quantized bases (QLoRA): 4-bit NF4 with double quantization, or 8-bit, through bitsandbytes.

bitsandbytes' k-bit kernels need a CUDA GPU; elsewhere asking for them is refused before any work
is done, with the way out named.
"""

from __future__ import annotations

import importlib.util

import torch

from lorafit.errors import ConfigError


def check_quantization(quantization: str, device: torch.device) -> None:
    """Raise ConfigError unless `model.quantization` can run here."""
    if quantization == "none":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"model.quantization: {quantization} needs a CUDA GPU (bitsandbytes' k-bit kernels); this machine has "
            "none. Set model.quantization: none (a 135M-1B model trains fine in bf16 on a CPU)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization: {quantization} needs the bitsandbytes package; pip install 'bitsandbytes>=0.43'."
        )


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `model.quantization` (None for 'none')."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=["lm_head"],
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])


def prepare_quantized(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """PEFT's k-bit training preparation: norms in fp32, input gradients enabled."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)

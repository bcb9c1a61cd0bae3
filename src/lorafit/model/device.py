"""Where and in what a model computes: the device, the precision policy (bf16 where the hardware
computes it fast, fp32 elsewhere), its torch dtype and autocast, and the process's peak memory."""

from __future__ import annotations

import functools
import resource
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512_BF16 or AMX on x86: bf16 matmuls run ~2.6x faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(requested: str, device: torch.device) -> str:
    """train.precision as it runs here: 'auto' is bf16 where it is fast (a CPU with AVX512_BF16/AMX,
    an Ampere-or-later GPU), fp16 on a GPU without bf16 (T4, V100), else fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    if precision in HALF_DTYPES:
        return torch.autocast(device_type=device.type, dtype=HALF_DTYPES[precision])
    return nullcontext()


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scale (torch's GradScaler, as accelerate builds it): gradients that
    overflow float16 skip their step and halve the scale. None for bf16/fp32, which need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a resolved precision ('bf16', 'fp16' or 'fp32') computes in."""
    return HALF_DTYPES.get(precision, torch.float32)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

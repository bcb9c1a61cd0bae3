"""Save what a run produced, atomically: an adapter as a standard PEFT folder plus `lorafit.json`
(base identity, config, metrics), or — for full fine-tuning — a whole transformers model folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lorafit import __version__
from lorafit.io import write_json_atomic
from lorafit.outputs import write_folder_atomically


def save_initial_adapter(peft_model, out_dir: Path) -> Path:
    """The adapter as initialised, for PiSSA/OLoRA: PEFT subtracts it when converting the trained
    adapter into a plain LoRA that applies to the untouched base weights."""
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # loading it must not run the SVD again
    try:
        return write_folder_atomically(
            out_dir, lambda folder: peft_model.save_pretrained(folder, safe_serialization=True)
        )
    finally:
        config.init_lora_weights = init


def save_adapter(
    peft_model,
    out_dir: Path,
    metadata: dict,
    initial_adapter: Path | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """PEFT folder + lorafit.json. With `initial_adapter` (PiSSA/OLoRA), the saved adapter is
    converted to a plain LoRA of twice the rank that applies to the original base weights.
    `weights` (whole trainable tensors by state-dict name) replace the model's own where an engine
    holds them in parts or in lower precision (ZeRO, FSDP)."""

    def write(folder: Path) -> None:
        extra = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
        if weights is not None:
            extra["state_dict"] = on_cpu(weights)
        with warnings.catch_warnings():
            # PEFT loads the initial adapter beside the trained one to convert it, and warns that
            # PiSSA/OLoRA should not be mixed with other adapters: the conversion is the remedy.
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            peft_model.save_pretrained(folder, safe_serialization=True, **extra)
        write_json_atomic(folder / "lorafit.json", {"lorafit_version": __version__, **metadata})

    return write_folder_atomically(out_dir, write)


def save_full_model(
    model, tokenizer, out_dir: Path, metadata: dict, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """A fully fine-tuned model as a plain transformers folder (safetensors, tokenizer, template);
    `weights` as in save_adapter."""

    def write(folder: Path) -> None:
        # Whole weights (ZeRO's fp32 masters) over the module's own entries: buffers and tied names stay.
        extra = {"state_dict": {**model.state_dict(), **on_cpu(weights)}} if weights is not None else {}
        model.save_pretrained(folder, safe_serialization=True, **extra)
        tokenizer.save_pretrained(folder)
        write_json_atomic(folder / "lorafit.json", {"lorafit_version": __version__, **metadata})

    return write_folder_atomically(out_dir, write)


def on_cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` as the state dict PEFT/transformers save from, on the CPU and as given: a ZeRO
    master is fp32 where the module computes in bf16, as one process keeps its LoRA weights. The
    model's own state_dict() is not read: under FSDP it reshards the model in this process alone,
    and the next forward's gathering would then differ between the processes."""
    return {name: value.to("cpu") for name, value in weights.items()}


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    """Size on disk of the weight files in `folder`."""
    return sum(path.stat().st_size for path in Path(folder).glob(pattern))

"""`lorafit export --format gguf`: a merged Llama-family model as one GGUF file for llama.cpp/Ollama.

Written with the `gguf` library (maintained by llama.cpp) for each architecture llama.cpp has for
the families (ARCHITECTURES: Llama 2/3 and Mistral as `llama`, Qwen2.5 as `qwen2` with its q/k/v
biases, Qwen3 as `qwen3` with its q/k norms, Phi-3 as `phi3` with its fused qkv and gate_up
tensors): tensors renamed to llama.cpp's names (its own `TensorNameMap`); for `llama`, q/k
projection rows reordered from transformers' rotate-half rotary layout to the interleaved pairs
llama.cpp rotates (the others rotate halves, as transformers does); Llama 3's rope scaling as the
`rope_freqs` factors llama.cpp multiplies in; the tokenizer carried whole (gguf_vocab.py) with the
chat template the adapter was trained with. Norms, biases and other 1-D tensors stay f32, as
llama.cpp expects. tests/test_families.py holds each family's file against the one llama.cpp's own
converter writes for the same model, key by key and tensor by tensor.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafit.adapters.gguf_vocab import add_vocab, read_vocab
from lorafit.adapters.merge import TensorFile, _base_tensor_files
from lorafit.errors import UsageError
from lorafit.io import partial_path
from lorafit.model.rope import rope_settings

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LORA_ALPHA = 1.0  # written into LoRA files; each module's true scale is folded into its B


def _gguf_types():
    import gguf

    tensor_types = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    return tensor_types, file_types


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows per head from halves (x0..x31 | x32..x63), the
    layout transformers rotates, to pairs (x0, x32, x1, x33, ...), the layout llama.cpp rotates."""
    rows, columns = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, columns).transpose(1, 2).reshape(rows, columns)


def llama_rotary_order(module: str, rows: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Output rows of `module` in llama.cpp's rotary order (only q and k projections change)."""
    if module.endswith("self_attn.q_proj"):
        return interleave_rotary_rows(rows, heads)
    if module.endswith("self_attn.k_proj"):
        return interleave_rotary_rows(rows, kv_heads)
    return rows


LORAFIT_KEY = "lorafit.version"  # stamped into every file lorafit writes: `--overwrite` replaces only those


@contextmanager
def gguf_writer(out_file: Path, arch: str = "llama"):
    """A GGUFWriter on a temporary file, renamed to `out_file` only once all is written."""
    import gguf

    from lorafit import __version__

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_file)
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_string(LORAFIT_KEY, __version__)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out_file)


def written_by_lorafit(path: Path) -> bool:
    """Whether `path` is a GGUF file lorafit wrote (it carries LORAFIT_KEY)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:  # not GGUF at all, or damaged: in any case not ours to replace
        return False
    return LORAFIT_KEY in reader.fields


@dataclass(frozen=True)
class Architecture:
    """How one transformers model type is laid out in llama.cpp."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    interleaved_rotary: bool  # llama.cpp rotates adjacent pairs: q/k rows are reordered
    vocab_size_key: bool = False  # the converter writes ARCH.vocab_size and ARCH.rope.dimension_count
    sliding_window_key: bool = False  # the converter writes ARCH.attention.sliding_window (0: none)


ARCHITECTURES = {
    "llama": Architecture("LLAMA", True, vocab_size_key=True),
    "mistral": Architecture("LLAMA", True, vocab_size_key=True),
    "qwen2": Architecture("QWEN2", False),
    "qwen3": Architecture("QWEN3", False),
    "phi3": Architecture("PHI3", False, sliding_window_key=True),
}
ROPE_TYPES = ("default", "llama3", "linear", "yarn")


def architecture_of(config: dict, folder: Path) -> Architecture:
    """The model's llama.cpp layout; what llama.cpp's architecture cannot express is refused by name."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"{folder}: model_type {model_type!r}; lorafit's GGUF export covers {', '.join(ARCHITECTURES)}."
        )
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise UsageError(
            f"{folder}: rope type {rope_type!r} is not exported to GGUF yet (exported: {', '.join(ROPE_TYPES)})."
        )
    if model_type in ("llama", "mistral") and (config.get("attention_bias") or config.get("mlp_bias")):
        raise UsageError(f"{folder}: biases in attention or MLP layers are not part of llama.cpp's llama layout.")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UsageError(f"{folder}: partial rotary embeddings are not exported to GGUF yet.")
    return ARCHITECTURES[model_type]


def _heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_model_metadata(writer, config: dict, layout: Architecture, gguf_type: str, name: str) -> None:
    """The hyperparameters, with the keys (and only the keys) llama.cpp's converter writes."""
    import gguf

    heads, kv_heads = _heads(config)
    rope = rope_settings(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    original_context = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if layout.sliding_window_key and original_context:
        writer.add_rope_scaling_orig_ctx_len(original_context)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim") and not layout.sliding_window_key:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(_gguf_types()[1][gguf_type])
    if layout.vocab_size_key:
        writer.add_vocab_size(config["vocab_size"])
    if layout.vocab_size_key or layout.sliding_window_key:
        writer.add_rope_dimension_count(_head_dim(config))
    if layout.sliding_window_key:
        writer.add_sliding_window(config.get("sliding_window") or 0)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3's rope scaling as llama.cpp applies it: one divisor per rotary frequency (`rope_freqs`):
    1 for high frequencies, `factor` for low ones, a smooth blend between. Computed in float32 in
    the converter's order of operations, so the factors equal its bit for bit."""
    rope = rope_settings(config)
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * math.pi / freqs
    smooth = (old_context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelengths > old_context / low, torch.tensor(factor, dtype=torch.float32), blended)
    factors = torch.where(wavelengths < old_context / high, torch.tensor(1.0, dtype=torch.float32), factors)
    return factors.numpy()


def _add_tensors(writer, folder: Path, config: dict, layout: Architecture, gguf_type: str) -> int:
    """Every weight of the model in `folder`, renamed, reordered and stored at `gguf_type`."""
    import gguf

    tensor_types = _gguf_types()[0]
    heads, kv_heads = _heads(config)
    arch = getattr(gguf.MODEL_ARCH, layout.gguf_arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    written = 0
    if rope_settings(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        written += 1
    handles: dict[Path, TensorFile] = {}
    try:
        for hf_name, file in _base_tensor_files(folder).items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if file not in handles:
                handles[file] = TensorFile(file)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UsageError(f"{folder}: tensor {hf_name} has no place in a {layout.gguf_arch.lower()} GGUF file.")
            tensor = handles[file].get(hf_name).float()
            if layout.interleaved_rotary:
                tensor = llama_rotary_order(hf_name.rsplit(".", 1)[0], tensor, heads, kv_heads)
            array = tensor.numpy()
            kind = tensor_types[gguf_type] if array.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16  # rows Q8_0 cannot block: kept at f16
            if kind == gguf.GGMLQuantizationType.F16:
                array = array.astype(np.float16)
            elif kind != gguf.GGMLQuantizationType.F32:
                array = gguf.quants.quantize(array, kind)
            writer.add_tensor(gguf_name, array, raw_dtype=kind)
            written += 1
    finally:
        for handle in handles.values():
            handle.close()
    return written


def write_gguf(
    folder: Path,
    out_file: Path,
    gguf_type: str = "f16",
    name: str = "",
    chat_template: str | None = None,
    pre_tokenizer: str | None = None,
) -> dict:
    """Write the transformers model in `folder` as a GGUF file (atomically); returns what was written."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--type {gguf_type}: use one of {', '.join(GGUF_TYPES)} (or q4_k_m, via llama.cpp).")
    config = json.loads((folder / "config.json").read_text())
    layout = architecture_of(config, folder)
    vocab = read_vocab(folder, pre_tokenizer, own_specials=config.get("model_type") == "phi3")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template_file = folder / "chat_template.jinja"
    template = chat_template or tokenizer_config.get("chat_template")
    if template is None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")

    out_file = Path(out_file)
    with gguf_writer(out_file, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.gguf_arch)]) as writer:
        _add_model_metadata(writer, config, layout, gguf_type, name or folder.name)
        add_vocab(writer, vocab, template)
        written = _add_tensors(writer, folder, config, layout, gguf_type)
    return {
        "file": str(out_file),
        "type": gguf_type,
        "architecture": writer.arch,
        "tensors": written,
        "bytes": out_file.stat().st_size,
        "pre_tokenizer": vocab.pre,
        "chat_template": bool(template),
    }


def write_lora_gguf(adapter, config: dict, out_file: Path, name: str = "") -> dict:
    """A llama.cpp LoRA adapter file (`llama-cli --lora FILE` over the base's GGUF): each adapted
    module's A and B (B's q/k rows in llama.cpp's rotary order where its layout needs it).
    llama.cpp scales every tensor of a LoRA file by one alpha over that tensor's rank; lorafit
    writes alpha LORA_ALPHA and folds each module's own scale (rsLoRA, alpha_pattern, rank_pattern)
    into its B, so every module comes out exact whatever its rank."""
    import gguf

    out_file = Path(out_file)
    layout = architecture_of(config, out_file.parent)
    if any("magnitude" in parts for parts in adapter.lora.values()):
        raise UsageError("A DoRA adapter has no llama.cpp LoRA form; export it merged (without --adapter-only).")
    if adapter.replaced:
        raise UsageError(
            f"The adapter replaces whole tensors ({next(iter(adapter.replaced))}, modules_to_save), which a "
            "llama.cpp LoRA file cannot carry; export it merged (without --adapter-only)."
        )
    heads, kv_heads = _heads(config)
    arch = getattr(gguf.MODEL_ARCH, layout.gguf_arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    with gguf_writer(out_file, gguf.MODEL_ARCH_NAMES[arch]) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or out_file.stem)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, LORA_ALPHA)
        for module, parts in sorted(adapter.lora.items()):
            base_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if base_name is None:
                raise UsageError(f"The adapter adapts {module}, which has no place in a {writer.arch} GGUF file.")
            rank = parts["A"].shape[0]
            b = parts["B"] * (adapter.scale(module) * rank / LORA_ALPHA)  # llama.cpp applies alpha / rank
            if layout.interleaved_rotary:
                b = llama_rotary_order(module, b, heads, kv_heads)
            writer.add_tensor(f"{base_name}.lora_a", parts["A"].numpy().astype(np.float32))
            writer.add_tensor(f"{base_name}.lora_b", b.numpy().astype(np.float32))
    return {
        "file": str(out_file),
        "type": "lora f32",
        "tensors": 2 * len(adapter.lora),
        "bytes": out_file.stat().st_size,
    }

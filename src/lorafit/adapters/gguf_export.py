"""`lorafit export --format gguf`: a merged Llama-family model as one GGUF file for llama.cpp/Ollama.

Written with the `gguf` library (maintained by llama.cpp): tensors renamed to llama.cpp's names
(its own `TensorNameMap`), q/k projection rows reordered from transformers' rotate-half rotary
layout to the interleaved pairs llama.cpp rotates, and the tokenizer carried whole — vocabulary,
merges, token types (special tokens as CONTROL, so llama.cpp parses and hides them), BOS/EOS/PAD,
the pre-tokenizer name llama.cpp keys its splitting rules on, and the chat template the adapter was
trained with. Norms and other 1-D tensors stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lorafit.adapters.merge import TensorFile, _base_tensor_files
from lorafit.errors import UsageError
from lorafit.io import partial_path

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LORA_ALPHA = 1.0  # written into LoRA files; each module's true scale is folded into its B
# transformers' pre-tokenizer of a model family -> llama.cpp's name for the same splitting rules.
PRE_TOKENIZERS = {"smollm": "smollm", "llama3": "llama-bpe", "llama-bpe": "llama-bpe", "gpt2": "gpt-2"}


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
def gguf_writer(out_file: Path):
    """A llama GGUFWriter on a temporary file, renamed to `out_file` only once all is written."""
    import gguf

    from lorafit import __version__

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_file)
    writer = gguf.GGUFWriter(str(partial), "llama")
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


def token_table(folder: Path) -> tuple[list[bytes], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer.json, ordered by id."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UsageError(f"{folder}/tokenizer.json: lorafit exports byte-level BPE tokenizers (GPT-2 style) to GGUF.")
    by_id = {index: text for text, index in model["vocab"].items()}
    special = {item["id"]: item["content"] for item in data.get("added_tokens", []) if item.get("special")}
    added = {item["id"]: item["content"] for item in data.get("added_tokens", [])}
    by_id.update(added)
    size = max(by_id) + 1
    tokens, types = [], []
    for index in range(size):
        text = by_id.get(index)
        if text is None:  # a hole in the id range: llama.cpp wants every id, unused ones marked
            tokens.append(f"[PAD{index}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text.encode("utf-8"))
        if index in special:
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def pre_tokenizer_name(folder: Path, given: str | None) -> str:
    """llama.cpp's pre-tokenizer name: given, recorded by a GGUF-born base, or known from the family."""
    if given:
        return given
    source = folder / "lorafit_source.txt"  # a base lorafit converted from GGUF: ask the original
    if source.is_file():
        from gguf import GGUFReader

        original = Path(source.read_text().splitlines()[0])
        if original.is_file():
            field = GGUFReader(str(original)).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return field.contents()
    config = json.loads((folder / "config.json").read_text())
    keys = ("_name_or_path", "_model_name_or_path", "name_or_path")
    name = " ".join(str(config.get(key) or "") for key in keys).lower()
    for key, value in PRE_TOKENIZERS.items():
        if key in name:
            return value
    raise UsageError(
        f"{folder}: cannot tell which llama.cpp pre-tokenizer this model's tokenizer matches; pass --pre-tokenizer "
        "(e.g. llama-bpe for Llama 3, smollm for SmolLM) so llama.cpp splits text as the model was trained."
    )


def rope_settings(config: dict) -> dict:
    """{'rope_theta', 'rope_type'} from a config.json of either transformers layout: 4.x keeps
    `rope_theta` (and `rope_scaling`) at the top level, 5.x nests them in `rope_parameters`."""
    nested = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    return {
        "rope_theta": float(nested.get("rope_theta", config.get("rope_theta", 10000.0))),
        "rope_type": nested.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default",
    }


def _check_architecture(config: dict, folder: Path) -> None:
    if config.get("model_type") != "llama":
        raise UsageError(
            f"{folder}: model_type {config.get('model_type')!r}; lorafit's GGUF export covers the llama architecture."
        )
    rope_type = rope_settings(config)["rope_type"]
    if rope_type != "default":
        raise UsageError(f"{folder}: rope type {rope_type!r} is not exported to GGUF yet (only plain RoPE).")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UsageError(f"{folder}: biases in attention or MLP layers are not part of the llama GGUF layout.")


def _heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads", heads)


def _add_model_metadata(writer, config: dict, gguf_type: str, name: str, file_types: dict) -> None:
    import gguf

    heads, kv_heads = _heads(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_types[gguf_type])


def _add_tokenizer(
    writer, folder: Path, tokens, token_types, merges, pre: str, tokenizer_config: dict, template
) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        text = tokenizer_config.get(f"{role}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None and text.encode("utf-8") in tokens:
            ids[role] = tokens.index(text.encode("utf-8"))
    if "eos" not in ids:
        raise UsageError(f"{folder}: the tokenizer names no EOS token that is in its vocabulary; cannot export.")
    writer.add_bos_token_id(ids.get("bos", ids["eos"]))
    writer.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids.get("pad", ids["eos"]))
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if template:
        writer.add_chat_template(template)


def _add_tensors(writer, folder: Path, config: dict, gguf_type: str, tensor_types: dict) -> int:
    """Every weight of the model in `folder`, renamed, reordered and stored at `gguf_type`."""
    import gguf

    heads, kv_heads = _heads(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    handles: dict[Path, TensorFile] = {}
    written = 0
    try:
        for hf_name, file in _base_tensor_files(folder).items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if file not in handles:
                handles[file] = TensorFile(file)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UsageError(f"{folder}: tensor {hf_name} has no place in a llama GGUF file.")
            tensor = handles[file].get(hf_name).float()
            array = llama_rotary_order(hf_name.removesuffix(".weight"), tensor, heads, kv_heads).numpy()
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
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--type {gguf_type}: use one of {', '.join(GGUF_TYPES)} (or q4_k_m, via llama.cpp).")
    config = json.loads((folder / "config.json").read_text())
    _check_architecture(config, folder)
    tensor_types, file_types = _gguf_types()
    tokens, token_types, merges = token_table(folder)
    pre = pre_tokenizer_name(folder, pre_tokenizer)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template_file = folder / "chat_template.jinja"
    template = chat_template or tokenizer_config.get("chat_template")
    if template is None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")

    out_file = Path(out_file)
    with gguf_writer(out_file) as writer:
        _add_model_metadata(writer, config, gguf_type, name or folder.name, file_types)
        _add_tokenizer(writer, folder, tokens, token_types, merges, pre, tokenizer_config, template)
        written = _add_tensors(writer, folder, config, gguf_type, tensor_types)
    return {
        "file": str(out_file),
        "type": gguf_type,
        "tensors": written,
        "bytes": out_file.stat().st_size,
        "pre_tokenizer": pre,
        "chat_template": bool(template),
    }


def write_lora_gguf(adapter, config: dict, out_file: Path, name: str = "") -> dict:
    """A llama.cpp LoRA adapter file (`llama-cli --lora FILE` over the base's GGUF): each adapted
    module's A and B (B's q/k rows in llama.cpp's rotary order). llama.cpp scales every tensor of
    a LoRA file by one alpha over that tensor's rank; lorafit writes alpha LORA_ALPHA and folds each
    module's own scale (rsLoRA, alpha_pattern, rank_pattern) into its B, so every module comes out
    exact whatever its rank."""
    import gguf

    out_file = Path(out_file)
    _check_architecture(config, out_file.parent)
    if any("magnitude" in parts for parts in adapter.lora.values()):
        raise UsageError("A DoRA adapter has no llama.cpp LoRA form; export it merged (without --adapter-only).")
    if adapter.replaced:
        raise UsageError(
            f"The adapter replaces whole tensors ({next(iter(adapter.replaced))}, modules_to_save), which a "
            "llama.cpp LoRA file cannot carry; export it merged (without --adapter-only)."
        )
    heads, kv_heads = _heads(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    with gguf_writer(out_file) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or out_file.stem)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, LORA_ALPHA)
        for module, parts in sorted(adapter.lora.items()):
            base_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if base_name is None:
                raise UsageError(f"The adapter adapts {module}, which has no place in a llama GGUF file.")
            rank = parts["A"].shape[0]
            b = parts["B"] * (adapter.scale(module) * rank / LORA_ALPHA)  # llama.cpp applies alpha / rank
            b = llama_rotary_order(module, b, heads, kv_heads)
            writer.add_tensor(f"{base_name}.lora_a", parts["A"].numpy().astype(np.float32))
            writer.add_tensor(f"{base_name}.lora_b", b.numpy().astype(np.float32))
    return {
        "file": str(out_file),
        "type": "lora f32",
        "tensors": 2 * len(adapter.lora),
        "bytes": out_file.stat().st_size,
    }

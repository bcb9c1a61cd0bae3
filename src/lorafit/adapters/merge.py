"""`lorafit merge`: base + LoRA adapter -> one plain transformers model folder, streamed.

The base weights are read one tensor at a time from their safetensors files, each adapted weight is
merged in fp32 (W + s·B·A; DoRA rescales each output row to its trained magnitude), cast once to
the output dtype and written into size-capped shards. Peak memory is one output shard plus the
adapter, not a model copy in fp32 as a load-then-`merge_and_unload` would take.

The adapter must be a plain LoRA as PEFT saves it: LoRA, rsLoRA (scale alpha/sqrt(r)), DoRA, and
PiSSA/OLoRA adapters, which lorafit saves converted to plain LoRA against the original base.
Per-module ranks and alphas (rank_pattern/alpha_pattern) are honoured; modules_to_save replace the
base tensor. Anything else PEFT can express is refused by name rather than merged wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import UsageError
from lorafit.integrity import check_safetensors, read_json_file
from lorafit.model.device import peak_rss_mb
from lorafit.model.rope import with_rope_scaling

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {  # adapter_config.json keys whose non-default values this merge cannot express
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "fan_in_fan_out": False,
    "use_bdlora": None,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SENTENCEPIECE_MODEL = "tokenizer.model"  # Llama 2, Mistral, Phi-3: llama.cpp's converter reads it


def copy_sentencepiece_model(base_folder: Path, folder: Path) -> None:
    """The base's SentencePiece model beside the saved tokenizer (transformers' fast tokenizer
    does not write it back), so tools that read it, llama.cpp's converter among them, still can."""
    source = Path(base_folder) / SENTENCEPIECE_MODEL
    if source.is_file() and not (folder / SENTENCEPIECE_MODEL).exists():
        shutil.copyfile(source, folder / SENTENCEPIECE_MODEL)


@dataclass
class AdapterWeights:
    """One LoRA adapter, grouped by the base module it adapts (names as in the base model)."""

    config: dict
    lora: dict[str, dict[str, torch.Tensor]]  # module -> {"A", "B", optional "magnitude"}
    replaced: dict[str, torch.Tensor]  # base tensor name -> full replacement (modules_to_save)

    def scale(self, module: str) -> float:
        rank = self.lora[module]["A"].shape[0]
        alpha = self.config.get("lora_alpha", 8)
        pattern = _pattern_value(self.config.get("alpha_pattern") or {}, module)
        alpha = pattern if pattern is not None else alpha
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str):
    """The rank or alpha `patterns` give `module`, by PEFT's own matching rule (None: the default)."""
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module)) if patterns else None


def read_adapter(path: Path) -> AdapterWeights:
    """The adapter's config and tensors, checked to be something this merge computes exactly."""
    from safetensors.torch import load_file

    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UsageError(f"{path}: not a PEFT adapter (adapter_config.json + adapter_model.safetensors).")
    config = read_json_file(config_file)
    check_safetensors(weights_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{path}: a {config['peft_type']} adapter; lorafit merges LoRA adapters.")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, False, None, [], {}):
            raise UsageError(f"{path}: adapter_config.json sets {key}={config[key]!r}, which lorafit cannot merge.")
    if config.get("bias", "none") != "none":
        raise UsageError(f"{path}: adapter_config.json trains biases (bias={config['bias']!r}); cannot merge.")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights_file)).items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name:
            module, part = re.split(r"\.lora_([AB])\.", name)[:2]
            lora.setdefault(module, {})[part] = tensor.float()
        elif ".lora_magnitude_vector" in name:
            lora.setdefault(name.split(".lora_magnitude_vector")[0], {})["magnitude"] = tensor.float()
        elif "lora_" in name:
            raise UsageError(f"{path}: the adapter holds {key} (an embedding or other LoRA kind); cannot merge it.")
        else:
            # modules_to_save: PEFT stores the trained copy under the base tensor's own name.
            replaced[name.replace(".modules_to_save", "")] = tensor
    broken = [module for module, parts in lora.items() if not {"A", "B"} <= set(parts)]
    if broken:
        raise UsageError(f"{path}: LoRA module {broken[0]} lacks its A or B matrix; the adapter file is damaged.")
    return AdapterWeights(config=config, lora=lora, replaced=replaced)


def merged_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """W + s·B·A in fp32; with DoRA each output row is then rescaled to its trained magnitude."""
    if (parts["B"].shape[0], parts["A"].shape[1]) != tuple(weight.shape):
        raise UsageError(
            f"The adapter's LoRA matrices make a {parts['B'].shape[0]} x {parts['A'].shape[1]} update for a "
            f"{weight.shape[0]} x {weight.shape[1]} base weight: it was trained on another base model; pass --base "
            "with that model."
        )
    merged = weight.float() + scale * (parts["B"] @ parts["A"])
    if "magnitude" in parts:
        # PEFT's DoRA: W' = m / ||W + s·B·A||_row · (W + s·B·A), the norm over each output row.
        norm = merged.norm(p=2, dim=1, keepdim=True)
        merged = merged * (parts["magnitude"].view(-1, 1) / norm)
    return merged


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    """Reads one tensor at a time from a safetensors file with plain reads, not a memory map: a
    mapped file's pages stay resident once touched, so a whole-model mmap read costs a model's
    worth of memory even though each tensor is used once."""

    def __init__(self, path: Path):
        self.handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        (length,) = struct.unpack("<Q", self.handle.read(8))
        self.header = json.loads(self.handle.read(length))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + length

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        start, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UsageError(
                f"{self.handle.name}: tensor {name} has dtype {entry['dtype']}, which lorafit cannot read."
            )
        self.handle.seek(self.data_start + start)
        data = bytearray(self.handle.read(end - start))
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])

    def close(self) -> None:
        self.handle.close()


def _base_tensor_files(folder: Path) -> dict[str, Path]:
    """Base tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UsageError(f"{index}: no 'weight_map' of tensor names to files; the index is damaged.")
        for file in sorted(set(weight_map.values())):
            check_safetensors(folder / file)
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"{folder}: the base model has no safetensors weights; lorafit merges safetensors bases.")
    check_safetensors(single)
    reader = TensorFile(single)
    try:
        return dict.fromkeys(reader.names(), single)
    finally:
        reader.close()


class ShardWriter:
    """Tensors appended one by one, flushed into model-0000N-of-0000M.safetensors shards."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        number = len(self.shards) + 1
        save_file(self.pending, str(self.out_dir / f"shard-{number}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = self.out_dir / "model.safetensors"
            (self.out_dir / "shard-1.tmp").rename(final)
            return [final]
        weight_map, files = {}, []
        for number, names in enumerate(self.shards, 1):
            final = self.out_dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"shard-{number}.tmp").rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files


def merge_into_folder(
    base_folder: Path,
    adapter: AdapterWeights,
    out_dir: Path,
    dtype: str = "bf16",
    max_shard_bytes: int = 2 * 1024**3,
    rope_scaling: dict | None = None,
) -> dict:
    """Write the merged model's safetensors and config.json into `out_dir` (which must exist);
    returns {'merged_modules', 'replaced_tensors', 'bytes', 'files'}. `rope_scaling`: the
    model.rope_scaling the adapter was trained with, written into the merged config.json."""
    target_dtype = DTYPES[dtype]
    tensor_files = _base_tensor_files(base_folder)
    config = with_rope_scaling(json.loads((base_folder / "config.json").read_text()), rope_scaling)
    modules = set(adapter.lora)
    missing = sorted(m for m in modules if f"{m}.weight" not in tensor_files)
    # With tied embeddings the output layer is the embedding matrix; an adapted or replaced head
    # (LoRA on lm_head, modules_to_save) gets its own tensor and the merged model is untied.
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in tensor_files
    tied_head = tied and "lm_head" in modules
    if tied_head:
        missing.remove("lm_head")
    missing += sorted(
        name for name in adapter.replaced if name not in tensor_files and not (tied and name == "lm_head.weight")
    )
    if missing:
        raise UsageError(f"The adapter changes {missing[0]}, which the base model at {base_folder} does not have.")
    writer = ShardWriter(out_dir, max_shard_bytes)
    merged_count = 0
    handles: dict[Path, TensorFile] = {}
    try:
        for name, file in tensor_files.items():
            if file not in handles:
                handles[file] = TensorFile(file)
            tensor = handles[file].get(name)
            module = name.removesuffix(".weight")
            if name in adapter.replaced:
                tensor = adapter.replaced[name]
            elif name.endswith(".weight") and module in modules:
                tensor = merged_weight(tensor, adapter.lora[module], adapter.scale(module))
                merged_count += 1
            writer.add(name, tensor.to(target_dtype) if tensor.is_floating_point() else tensor)
        untied_head = tied and (tied_head or "lm_head.weight" in adapter.replaced)
        if untied_head:
            head = adapter.replaced.get("lm_head.weight")
            if head is None:
                embedding = handles[tensor_files["model.embed_tokens.weight"]].get("model.embed_tokens.weight")
                head = merged_weight(embedding, adapter.lora["lm_head"], adapter.scale("lm_head"))
                merged_count += 1
            writer.add("lm_head.weight", head.to(target_dtype))
        files = writer.close()
    finally:
        for handle in handles.values():
            handle.close()
    if untied_head:
        config["tie_word_embeddings"] = False
    config["torch_dtype"] = config["dtype"] = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = base_folder / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, out_dir / generation.name)
    return {
        "merged_modules": merged_count,
        "replaced_tensors": len(adapter.replaced),
        "bytes": writer.total_bytes,
        "files": [f.name for f in files],
    }


@dataclass
class MergeResult:
    out_dir: Path
    summary: dict


def merge_adapter(
    spec: str,
    out_dir: Path,
    dtype: str = "bf16",
    base: str | None = None,
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> MergeResult:
    """Merge the adapter named by `spec` (a run folder or adapter folder) into its base model and
    write a plain transformers folder: sharded safetensors, config, tokenizer with the chat
    template the adapter was trained with, and lorafit.json recording where it came from."""
    import time

    from lorafit import __version__
    from lorafit.adapters.load import locate_trained, resolve_trained_base
    from lorafit.artifacts import BaseModelRecord
    from lorafit.io import write_json_atomic
    from lorafit.model.load import load_tokenizer
    from lorafit.outputs import check_output_folder, write_folder_atomically

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}.")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "model", overwrite)
    trained = locate_trained(spec)
    if trained.kind != "lora":
        raise UsageError(f"{trained.path} is a fully fine-tuned model already; there is no adapter to merge.")
    ref, fingerprint = resolve_trained_base([trained], base, allow_base_mismatch)
    adapter = read_adapter(trained.path)
    tokenizer = load_tokenizer(ref)
    if trained.chat_template:  # the template the adapter learned its answers in travels with the model
        tokenizer.chat_template = trained.chat_template.text
    started = time.perf_counter()
    summary: dict = {}

    def write(folder: Path) -> None:
        summary.update(merge_into_folder(Path(ref.path), adapter, folder, dtype, max_shard_bytes, ref.rope_scaling))
        tokenizer.save_pretrained(folder)
        copy_sentencepiece_model(Path(ref.path), folder)
        # The adapter's record (config, tokenizer, template, data, metrics) travels with the model.
        record = dataclasses.replace(
            trained.record,
            lorafit_version=__version__,
            merged_from={"adapter": str(trained.path.resolve()), "name": trained.name, "dtype": dtype},
            base_model=BaseModelRecord(spec=ref.spec, name=ref.name, path=ref.path, weights_fingerprint=fingerprint),
        )
        write_json_atomic(folder / "lorafit.json", record.to_json())

    write_folder_atomically(out_dir, write, kind="model")
    summary.update(
        seconds=time.perf_counter() - started,
        peak_rss_mb=peak_rss_mb(),
        adapter=str(trained.path),
        base=ref.name,
        dtype=dtype,
    )
    return MergeResult(out_dir=out_dir, summary=summary)

"""Resolve a base model name to a local folder, and load model and tokenizer from it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import ModelError
from lorafit.integrity import check_gguf, check_safetensors, read_json_file
from lorafit.model.embedded import EMBEDDED_NAME, cached_gguf_folder, embedded_model_folder
from lorafit.model.rope import check_context, with_rope_scaling

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class BaseModelRef:
    """Where a base model lives and what to call it in records (adapters, reports)."""

    spec: str  # what the user wrote ("" for the embedded default)
    name: str  # human-readable identity
    path: str  # local folder, or hub id when the hub is used
    rope_scaling: dict | None = None  # model.rope_scaling, applied to the config whenever it is loaded


def resolve_base(spec: str, rope_scaling: dict | None = None) -> BaseModelRef:
    """'' -> embedded default; folder -> itself; .gguf -> cached conversion; 'org/name' -> hub id.
    `rope_scaling` (model.rope_scaling, as a run or an adapter records it) travels with the ref."""
    ref = _resolve_base(spec)
    ref.rope_scaling = rope_scaling
    return ref


def _resolve_base(spec: str) -> BaseModelRef:
    if not spec:
        return BaseModelRef(spec="", name=EMBEDDED_NAME, path=str(embedded_model_folder()))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json; point model.base at a transformers model folder.")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelError(
                f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)}); "
                "copy the model's weight files into it."
            )
        return BaseModelRef(spec=spec, name=path.name, path=str(path))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file.")
        check_gguf(path)
        return BaseModelRef(spec=spec, name=path.stem, path=str(cached_gguf_folder(path, path.stem)))
    if path.exists():
        raise ModelError(f"{path}: not a model folder or .gguf file.")
    if _HUB_ID.match(spec):
        ref = BaseModelRef(spec=spec, name=spec, path=spec)
        if not hub_reachable():
            raise _hub_failure(ref, "the Hub cannot be reached from this machine")
        return ref
    raise ModelError(f"model.base '{spec}': no such folder or file, and not a hub id like 'org/name'.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe, so an offline machine gets our message at once instead of a minute
    of download retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_failure(ref: BaseModelRef, why: Exception | str) -> ModelError:
    reason = why if isinstance(why, str) else why.__class__.__name__
    return ModelError(
        f"Could not load '{ref.spec}' from the Hugging Face Hub ({reason}). "
        "If this machine is offline, download the model elsewhere and set model.base to its local "
        "folder (or a .gguf file); leave model.base empty for the embedded default."
    )


def load_model_config(ref: BaseModelRef):
    """The base's transformers config, with the ref's rope scaling applied."""
    from transformers import AutoConfig

    config_file = Path(ref.path) / "config.json"
    if config_file.is_file():
        read_json_file(config_file)  # a cut file gets its own message, with the line
    try:
        config = AutoConfig.from_pretrained(ref.path)
        if ref.rope_scaling is None:
            return config
        scaled = with_rope_scaling(config.to_dict(), ref.rope_scaling)
        rope_keys = ("rope_parameters", "rope_scaling", "max_position_embeddings")
        changed = {key: scaled[key] for key in rope_keys if key in scaled}
        return AutoConfig.from_pretrained(ref.path, **changed)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{ref.path}: cannot read the model's config.json ({exc}).") from None


def check_seq_len(seq_len: int, ref: BaseModelRef, setting: str = "train.seq_len") -> None:
    """Refuse a context longer than the model is meant for: the base's trained context, or what the
    ref's rope scaling extends it to; the message names the setting to lower or the factor to set."""
    base_config = load_model_config(BaseModelRef(ref.spec, ref.name, ref.path)).to_dict()
    if base_config.get("max_position_embeddings"):
        check_context(seq_len, base_config, ref.rope_scaling, setting)


def load_tokenizer(ref: BaseModelRef):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path)
    except OSError as exc:
        if ref.path == ref.spec and not Path(ref.spec).exists():
            raise _hub_failure(ref, exc) from None
        raise ModelError(f"{ref.path}: cannot load the tokenizer ({exc}).") from None
    except Exception as exc:  # a damaged tokenizer.json raises whatever its parser meets
        raise ModelError(
            f"{ref.path}: cannot load the tokenizer ({type(exc).__name__}: {exc}); check tokenizer.json and "
            "tokenizer_config.json."
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{ref.path}: lorafit needs a fast (tokenizers) tokenizer; add tokenizer.json.")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{ref.path}: the tokenizer defines no EOS token; set eos_token in tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(ref: BaseModelRef, dtype: torch.dtype = torch.float32, quantization_config=None):
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization_config, "device_map": {"": 0}} if quantization_config else {}
    folder = Path(ref.path)
    for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        check_safetensors(weights)  # a truncated file, named, instead of a parser's traceback
    if ref.rope_scaling is not None:
        extra["config"] = load_model_config(ref)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            ref.path,
            dtype=dtype,
            attn_implementation="sdpa",
            # Mismatches are reported in `info` and refused below, with the shapes named.
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **extra,
        )
    except OSError as exc:
        if ref.path == ref.spec and not Path(ref.spec).exists():
            raise _hub_failure(ref, exc) from None
        raise ModelError(f"{ref.path}: cannot load the model ({exc}).") from None
    except (RuntimeError, ValueError) as exc:  # weights transformers cannot place under this config.json
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(
            f"{ref.path}: cannot load the weights with its config.json ({lines[-1] if lines else type(exc).__name__}); "
            "use the config.json that came with these weights."
        ) from None
    check_loading_info(ref.path, model, info)
    model.config.use_cache = False
    return model


def check_loading_info(path: str, model, info: dict) -> None:
    """Refuse a model whose weights do not cover what its config.json describes: transformers
    would initialise the missing tensors at random and train on them without a word."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    mismatched = [
        f"{name} {tuple(saved)} vs {tuple(wanted)}" for name, saved, wanted in info.get("mismatched_keys") or ()
    ]
    unexpected = sorted(info.get("unexpected_keys") or ())
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} weights have other shapes than config.json says ({mismatched[0]})")
    if missing:
        problems.append(f"{len(missing)} weights that config.json asks for are missing ({missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} stored weights fit nothing in config.json ({unexpected[0]})")
    if problems:
        raise ModelError(
            f"{path}: config.json does not match the weights: {'; '.join(problems)}. Use the config.json that came "
            "with these weights."
        )


CONTENT_PREFIX = "tensors:"
SAMPLE_BYTES = 4096  # read at the start, middle and end of every tensor


def weights_fingerprint(ref: BaseModelRef) -> str:
    """An identity of the base weights' content, cheap at any size: every tensor's name, dtype and
    shape and a sample of its bytes (start, middle, end), plus config.json. Two bases that differ
    in any tensor's values almost surely differ in these samples (a fine-tune moves every weight);
    reading a few KiB per tensor keeps a 7B base's fingerprint under a second."""
    folder = Path(ref.path)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        _hash_safetensors_sample(path, digest)
    for path in sorted(folder.glob("*.bin")):  # pickled weights: no tensor table; sample the file
        with path.open("rb") as handle:
            _hash_byte_sample(handle, 0, path.stat().st_size, digest)
    _hash_config(folder, digest)
    return CONTENT_PREFIX + digest.hexdigest()[:16]


def _hash_safetensors_sample(path: Path, digest) -> None:
    with path.open("rb") as handle:
        try:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
            entries = {k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, MemoryError, OverflowError):
            raise ModelError(f"{path}: the safetensors header cannot be read; the file is damaged.") from None
        data_start = 8 + header_size
        for name in sorted(entries):
            dtype, shape, (begin, end) = entries[name]
            digest.update(f"{name}:{dtype}:{shape}".encode())
            _hash_byte_sample(handle, data_start + begin, data_start + end, digest)


def _hash_byte_sample(handle, begin: int, end: int, digest) -> None:
    size = end - begin
    for start in sorted({begin, begin + max(0, size // 2 - SAMPLE_BYTES // 2), max(begin, end - SAMPLE_BYTES)}):
        handle.seek(start)
        digest.update(handle.read(min(SAMPLE_BYTES, end - start)))


def _hash_config(folder: Path, digest) -> None:
    config = folder / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())


def file_listing_fingerprint(ref: BaseModelRef) -> str:
    """The fingerprint older lorafit versions recorded: the weight files' names and sizes plus
    config.json. Kept only to recognise their adapters' bases (see adapters.load.same_weights)."""
    folder = Path(ref.path)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    _hash_config(folder, digest)
    return digest.hexdigest()[:16]


def tokenizer_identity(tokenizer, ref: BaseModelRef) -> dict:
    """What an adapter records of the tokenizer it was trained with (lorafit.json)."""
    file = Path(ref.path) / "tokenizer.json"
    return {
        "path": ref.path,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None,
    }

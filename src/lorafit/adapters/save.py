"""Save what a run produced, atomically: an adapter as a standard PEFT folder plus `lorafit.json`
(base identity, config, metrics), or — for full fine-tuning — a whole transformers model folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from lorafit import __version__
from lorafit.io import UMASK, staging_prefix, write_json_atomic
from lorafit.outputs import foreign_entries, mark_output_folder, sweep_stale


def write_folder_atomically(out_dir: Path, write: Callable[[Path], None], kind: str | None = None) -> Path:
    """Fill a temporary sibling folder with `write`, then rename it into place (never half-written).

    With `kind` (a command's own output, not a part of a run folder) the folder is marked as that
    kind of lorafit output, and whatever the user keeps in a replaced folder moves into the new one:
    only lorafit's own files are replaced (the caller has checked the folder with
    `check_output_folder`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir.name), dir=out_dir.parent))
    os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp's 0700 would hide a shared output from others
    # Not a temporary name: if the process dies between the renames, the old folder (and anything
    # of the user's in it) stays where it is, never swept away.
    backup = out_dir.with_name(f".lorafit-replaced-{os.getpid()}-{out_dir.name}")
    try:
        write(staging)
        if kind is not None:
            mark_output_folder(staging, kind)
        if out_dir.exists():
            os.rename(out_dir, backup)
            os.rename(staging, out_dir)
            if kind is not None:
                for name in foreign_entries(backup, kind):
                    os.rename(backup / name, out_dir / name)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


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


def save_adapter(peft_model, out_dir: Path, metadata: dict, initial_adapter: Path | None = None) -> Path:
    """PEFT folder + lorafit.json. With `initial_adapter` (PiSSA/OLoRA), the saved adapter is
    converted to a plain LoRA of twice the rank that applies to the original base weights."""

    def write(folder: Path) -> None:
        extra = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
        with warnings.catch_warnings():
            # PEFT loads the initial adapter beside the trained one to convert it, and warns that
            # PiSSA/OLoRA should not be mixed with other adapters: the conversion is the remedy.
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            peft_model.save_pretrained(folder, safe_serialization=True, **extra)
        write_json_atomic(folder / "lorafit.json", {"lorafit_version": __version__, **metadata})

    return write_folder_atomically(out_dir, write)


def save_full_model(model, tokenizer, out_dir: Path, metadata: dict) -> Path:
    """A fully fine-tuned model as a plain transformers folder (safetensors, tokenizer, template)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_json_atomic(folder / "lorafit.json", {"lorafit_version": __version__, **metadata})

    return write_folder_atomically(out_dir, write)


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    """Size on disk of the weight files in `folder`."""
    return sum(path.stat().st_size for path in Path(folder).glob(pattern))

"""Save an adapter as a standard PEFT folder plus `lorafit.json` (base identity, config, metrics)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorafit import __version__
from lorafit.io import write_json_atomic


def save_adapter(peft_model, out_dir: Path, metadata: dict) -> Path:
    """Write the adapter to a temporary folder and rename it into place (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(staging, safe_serialization=True)
        write_json_atomic(staging / "lorafit.json", {"lorafit_version": __version__, **metadata})
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(out_dir, backup)
            os.rename(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

"""The run folder: created or refused, trimmed on resume, and the fingerprints of a run's inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorafit.config import RunConfig
from lorafit.data.pack import PackedBlocks
from lorafit.errors import UsageError
from lorafit.io import write_text_atomic

RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "tasks.json",
    "base_outputs.json",
    "report.json",
    "report.md",
    "report.html",
)
RUN_FOLDERS = ("checkpoints", "adapter", "adapter-init", "model")


def prepare_out_dir(out_dir: Path, overwrite: bool, resuming: bool) -> None:
    if resuming:
        if not (out_dir / "config.yaml").is_file():
            raise UsageError(f"--resume: {out_dir} holds no run to resume; check --out.")
        return
    if (out_dir / "config.yaml").exists() and not overwrite:
        raise UsageError(
            f"{out_dir} already holds a run (config.yaml); choose another --out, continue it with --resume, "
            "or replace it with --overwrite."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # An old run's outputs are not ours: a different method or init would leave stale ones beside ours.
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)


def keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop the lines an interrupted run wrote after its last checkpoint."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def input_fingerprints(
    config: RunConfig, train_blocks: PackedBlocks, valid_blocks: PackedBlocks, base_fingerprint: str
) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    flat = {
        f"{section}.{key}": value
        for section, values in config.model_dump(mode="json").items()
        if isinstance(values, dict)
        for key, value in values.items()
    }
    return {
        "config": flat,
        "train_data": train_blocks.digest(),
        "valid_data": valid_blocks.digest(),
        "base_model": base_fingerprint,
    }

"""Checkpoints that resume exactly: trainable weights, optimizer, loop state, data position, RNGs.

A checkpoint is a folder `OUT/checkpoints/step-N/`, written to a temporary name, fsynced and renamed
so a crash (even SIGKILL) leaves the previous checkpoints intact and never a half-written one:

    trainable.safetensors   trainable parameters (the LoRA weights), by name
    best.safetensors        the best-validation weights so far, when there are any
    optimizer.pt            optimizer state (under DeepSpeed ZeRO: a list, one partition per rank;
                            under FSDP: the whole state by parameter name)
    scaler.pt               fp16's loss-scaler state (scale, growth tracker), for fp16 runs
    rng.pt                  python, numpy and torch (CPU and CUDA) generator states
    state.json              step, counters, data position (epoch, index), config and data fingerprints
    adapter/                the same weights as a PEFT adapter, usable on its own
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import UsageError
from lorafit.integrity import DamagedFileError, check_safetensors, read_json_file
from lorafit.io import to_json
from lorafit.outputs import write_folder_atomically
from lorafit.training.loop import LoopState
from lorafit.training.sharded_state import PLAIN, full_shape, load_optimizer_state, load_trainable_state

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict | list,
    state: LoopState,
    record: dict,
    save_adapter_to=None,
    keep: int = 3,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write checkpoint `root/step-N` atomically and keep only the newest `keep` of them: the whole
    trainable `weights` and the `optimizer_state` (sharded_state gathers both from every rank).
    `record` (JSON) holds at least the data `position` and the input `fingerprints`."""
    root.mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "trainable.safetensors"))
        if state.best_trainable is not None:
            save_file({k: v.contiguous() for k, v in state.best_trainable.items()}, str(folder / "best.safetensors"))
        torch.save(optimizer_state, folder / "optimizer.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), folder / "scaler.pt")
        torch.save(rng_state(), folder / "rng.pt")
        # The best weights have their own file; an interruption belongs to this process only.
        loop = {
            f.name: getattr(state, f.name) for f in fields(state) if f.name not in ("best_trainable", "interrupted_by")
        }
        (folder / "state.json").write_text(to_json({"loop": loop, **record}, indent=2))
        if save_adapter_to is not None:
            save_adapter_to(folder / "adapter")

    # Staged, fsynced and renamed: a crash (even SIGKILL) leaves the previous checkpoints whole.
    target = write_folder_atomically(root / f"step-{state.step}", write)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(out_dir: Path, resume: str, warn=lambda message: None) -> tuple[Path, CheckpointFiles]:
    """'latest' -> the newest readable checkpoint in OUT/checkpoints (a damaged one is skipped,
    `warn`ed about, for the one before it); otherwise the checkpoint folder given, which must be whole."""
    if resume == "latest":
        found = list_checkpoints(out_dir / "checkpoints")
        if not found:
            raise UsageError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; train without --resume first.")
        return newest_readable(found, warn)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UsageError(f"--resume {path}: not a lorafit checkpoint (no state.json); expected OUT/checkpoints/step-N.")
    return path, read_checkpoint(path)


def newest_readable(found: list[Path], warn) -> tuple[Path, CheckpointFiles]:
    """The newest of `found` (oldest first) whose files are all whole."""
    damage = []
    for path in reversed(found):
        try:
            files = read_checkpoint(path)
        except DamagedFileError as exc:
            damage.append(str(exc))
            continue
        if damage:
            warn(f"skipped {len(damage)} damaged checkpoint(s) ({'; '.join(damage)}); using {path}")
        return path, files
    raise UsageError(
        f"Every checkpoint is damaged ({'; '.join(damage)}); start over with --overwrite, or restore one of them."
    )


def changed_fingerprints(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what differs between the checkpoint's inputs and the current ones."""
    changes = []
    old_config, new_config = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            changes.append(f"{key}: {old_config.get(key)!r} -> {new_config.get(key)!r}")
    for key in ("train_data", "valid_data", "base_model"):
        if saved.get(key) != current.get(key):
            changes.append(f"{key.replace('_', ' ')} changed")
    return changes


@dataclass
class CheckpointFiles:
    """A checkpoint read whole into memory, before anything of it is applied."""

    record: dict
    weights: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict
    rng: dict
    scaler: dict | None = None


def _read(path: Path, reader):
    try:
        return reader(path)
    except DamagedFileError:
        raise
    except Exception as exc:  # torch.load / safetensors on a cut file raise whatever their parser meets
        raise DamagedFileError(f"{path}: cannot be read ({type(exc).__name__}); the file is damaged.") from None


def read_checkpoint(path: Path) -> CheckpointFiles:
    """Every file of checkpoint `path`, checked; DamagedFileError names the first that is not whole."""
    record = read_json_file(path / "state.json")
    if not isinstance(record.get("loop"), dict) or "position" not in record:
        raise DamagedFileError(f"{path / 'state.json'}: no loop state or data position; the file is damaged.")

    def tensors(file: Path) -> dict[str, torch.Tensor]:
        check_safetensors(file)
        return load_file(str(file))

    best, scaler = path / "best.safetensors", path / "scaler.pt"
    return CheckpointFiles(
        record=record,
        weights=_read(path / "trainable.safetensors", tensors),
        best=_read(best, tensors) if best.is_file() else None,
        optimizer=_read(path / "optimizer.pt", lambda file: torch.load(file, weights_only=False)),
        rng=_read(path / "rng.pt", lambda file: torch.load(file, weights_only=False)),
        scaler=_read(scaler, lambda file: torch.load(file, weights_only=True)) if scaler.is_file() else None,
    )


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    files: CheckpointFiles | None = None,
    scaler: torch.amp.GradScaler | None = None,
    engine: str = PLAIN,
) -> tuple[LoopState, dict]:
    """Restore weights, optimizer, loss scale and RNGs in place (every process of a run, together);
    returns the loop state and the data position."""
    files = files or read_checkpoint(path)
    record, weights = files.record, files.weights
    params = dict(model.named_parameters())
    foreign = [name for name, t in weights.items() if name not in params or full_shape(params[name]) != t.shape]
    if foreign:
        raise UsageError(
            f"{path}: checkpoint weights {foreign[:3]} do not fit this model/LoRA set-up (was lora.r or "
            "lora.target_modules changed?); resume with the configuration that wrote it."
        )
    load_trainable_state(model, weights)
    try:
        load_optimizer_state(engine, model, optimizer, files.optimizer)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{path / 'optimizer.pt'}: does not fit this run's optimizer ({exc}).") from None
    if scaler is not None and files.scaler is not None:
        scaler.load_state_dict(files.scaler)
    set_rng_state(files.rng)
    defaults = {f.name: f.default for f in fields(LoopState)}
    saved_loop = dict(record["loop"])
    if "lr_scale" in saved_loop:  # the name a checkpoint of an earlier lorafit gives the rollback factor
        saved_loop.setdefault("rollback_lr_scale", saved_loop.pop("lr_scale"))
    # Strict JSON stores an infinite best loss (nothing validated yet) as null.
    loop = {
        k: defaults[k] if v is None and isinstance(defaults[k], float) else v
        for k, v in saved_loop.items()
        if k in defaults
    }
    state = LoopState(**loop)
    state.best_trainable = files.best
    return state, record

"""The base model's measurements, kept across runs: its validation and general-text perplexity,
side-by-side generations and task answers depend only on the base weights, the evaluation data and
how they are measured — not on the recipe trained afterwards. Comparing recipes, or re-running one,
then measures the base once (the minutes of greedy task answers included).

The key covers everything the figures depend on: lorafit's version, the base weights' fingerprint,
precision and device, the validation and general blocks (their digests), the task records, the
prompts and chat template, the generation lengths and batch sizes. Only where the model as set up
computes the base exactly (a fresh LoRA: B = 0 adds exact zeros; or an adapter switched off) is a
measurement shared: not for DoRA, PiSSA/OLoRA/LoftQ/EVA, full fine-tuning or quantized bases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lorafit import __version__
from lorafit.compute.perplexity import LossResult
from lorafit.config import RunConfig
from lorafit.errors import LorafitError
from lorafit.evaluation.core import EvalInputs
from lorafit.home import lorafit_home
from lorafit.integrity import read_json_file
from lorafit.io import write_json_atomic
from lorafit.model.lora import changes_base_weights

CACHE_VERSION = 1


def base_measurement_file(
    config: RunConfig, evaluation: EvalInputs, base_fingerprint: str, precision: str, device: torch.device
) -> Path | None:
    """Where this run's base measurement is kept; None when it cannot be shared."""
    lora = config.lora
    exact_base = (
        config.train.method == "lora"
        and config.model.quantization == "none"
        and not lora.use_dora
        and (lora.init in ("default", "gaussian") or bool(lora.init_from))
    )
    if not exact_base or changes_base_weights(lora):
        return None
    parts = {
        "cache": CACHE_VERSION,
        "lorafit": __version__,
        "base": base_fingerprint,
        "precision": precision,
        "device": device.type,
        "domain": evaluation.domain.digest(),
        "general": evaluation.general.digest() if evaluation.general is not None else None,
        "loss_batch": evaluation.loss_batch,
        "generate_batch": evaluation.generate_batch_size,
        "max_new_tokens": evaluation.max_new_tokens,
        "task_max_new_tokens": evaluation.task_max_new_tokens,
        "prompts": evaluation.fed_prompts,
        "template": evaluation.template.text if evaluation.template is not None else None,
        "tasks": [
            [task_set.name, [[r.messages, r.choices, r.answer] for r in task_set.records]]
            for task_set in evaluation.task_sets
        ],
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return lorafit_home() / "base-measurements" / f"{key}.json"


def read_base_measurement(path: Path | None) -> tuple[LossResult, LossResult | None, dict] | None:
    """(validation loss, general loss, outputs) measured before, or None (none kept, or unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        raw = read_json_file(path)
        before = LossResult(**raw["before"])
        general = LossResult(**raw["general"]) if raw.get("general") else None
        return before, general, raw["outputs"]
    except (LorafitError, KeyError, TypeError, ValueError):  # a damaged entry is measured again, never trusted
        return None


def keep_base_measurement(path: Path | None, before: LossResult, general: LossResult | None, outputs: dict) -> None:
    if path is None:
        return
    record = {
        "before": {"nll_sum": before.nll_sum, "tokens": before.tokens},
        "general": None if general is None else {"nll_sum": general.nll_sum, "tokens": general.tokens},
        "outputs": outputs,
    }
    write_json_atomic(path, record)

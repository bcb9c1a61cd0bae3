"""The evaluation report: did the adaptation help, and what did it cost?

One dict with stable keys (`report.json`, documented in the README), rendered as `report.md` and
as a self-contained `report.html` whose plots are PNGs embedded in the page. The base model is
always `models[0]`; every change is relative to it. `lorafit train` and `lorafit eval` both fill
`ModelEvaluation`s and call `write_report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import __version__
from lorafit.artifacts import REPORT_FILES, RunSummary
from lorafit.compute.perplexity import LossResult
from lorafit.data.datasets import GENERAL_SAMPLE
from lorafit.data.pack import IGNORE_INDEX, PackedBlocks
from lorafit.evaluation.metrics import TASK_METRICS
from lorafit.io import write_json_atomic, write_text_atomic

REPORT_VERSION = 1


@dataclass
class ModelEvaluation:
    """What was measured of one model (the base, an adapter or a fully fine-tuned model)."""

    name: str
    kind: str  # "base", "lora" or "full"
    path: str | None = None
    domain: LossResult | None = None
    general: LossResult | None = None
    tasks: dict = field(default_factory=dict)  # answer_metrics() output (+ mc_accuracy, mc_count)
    task_sets: dict[str, dict] = field(default_factory=dict)  # the same per eval.tasks / --tasks file
    generations: list[str] = field(default_factory=list)
    cost: dict = field(default_factory=dict)  # see README "report.json"
    curves: dict | None = None  # {"train": [[step, loss], ...], "valid": [[step, loss], ...]}


def _change(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value / base - 1.0)


def _loss_fields(prefix: str, result: LossResult | None, base: LossResult | None) -> dict:
    return {
        f"{prefix}_loss": None if result is None else result.loss,
        f"{prefix}_ppl": None if result is None else result.perplexity,
        f"{prefix}_tokens": None if result is None else result.tokens,
        f"{prefix}_ppl_change_percent": None
        if result is None or base is None or result is base
        else _change(result.perplexity, base.perplexity),
    }


def training_cost(summary: RunSummary) -> dict:
    """report.json's `cost` of a trained model, from its run's summary.json (None where unknown)."""
    return {
        "train_seconds": summary.train_seconds,
        "train_tokens": summary.train_tokens,
        "train_tokens_per_second": summary.tokens_per_second,
        "peak_memory_mb": summary.peak_rss_mb,
        "trainable_parameters": summary.parameter_count("trainable"),
        "trainable_percent": summary.parameter_count("percent"),
        "total_parameters": summary.parameter_count("total"),
        "saved_bytes": summary.saved_bytes,
        "wall_seconds": summary.wall_seconds,
    }


def blocks_info(blocks: PackedBlocks | None, files: list[str], seq_len: int) -> dict | None:
    """report.json's description of the evaluation text behind a perplexity."""
    if blocks is None:
        return None
    scored = int((blocks.full_labels()[:, 1:] != IGNORE_INDEX).sum())
    return {"files": files, "blocks": len(blocks), "tokens": scored, "seq_len": seq_len}


def general_files(paths: list[str]) -> list[str]:
    """eval.general / --general as a reader should see them."""
    return [f"{GENERAL_SAMPLE} (lorafit's general-English sample)" if p == GENERAL_SAMPLE else p for p in paths]


def build_report(models: list[ModelEvaluation], base_model: dict, data: dict, prompts: list[str]) -> dict:
    """report.json: `models[0]` is the base; `generations[i].outputs` follows the order of `models`."""
    if not models or models[0].kind != "base":
        raise ValueError("the report's first model is the base model")
    base = models[0]
    entries = []
    for model in models:
        entry = {"name": model.name, "kind": model.kind, "path": model.path}
        entry.update(_loss_fields("domain", model.domain, base.domain))
        entry.update(_loss_fields("general", model.general, base.general))
        entry["tasks"] = dict(model.tasks)
        entry["tasks_change"] = {} if model is base else metric_changes(model.tasks, base.tasks)
        entry["task_sets"] = {name: dict(metrics) for name, metrics in model.task_sets.items()}
        entry["task_sets_change"] = (
            {}
            if model is base
            else {
                name: metric_changes(metrics, base.task_sets[name])
                for name, metrics in model.task_sets.items()
                if name in base.task_sets
            }
        )
        entry["cost"] = dict(model.cost)
        entry["curves"] = model.curves
        entries.append(entry)
    report = {
        "report_version": REPORT_VERSION,
        "lorafit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": base_model,
        "data": data,
        "models": entries,
        "generations": [
            {"prompt": prompt, "outputs": [m.generations[i] if i < len(m.generations) else "" for m in models]}
            for i, prompt in enumerate(prompts)
        ],
    }
    set_names = [task_set["name"] for task_set in ((data.get("tasks") or {}).get("sets") or [])]
    report["transfer"] = transfer_summary(set_names, {e["name"]: e["task_sets_change"] for e in entries[1:]})
    return report


def metric_changes(metrics: dict, base: dict) -> dict:
    """Each task metric minus the base's."""
    return {name: metrics[name] - base[name] for name in TASK_METRICS if name in metrics and name in base}


def _primary_metric(metrics: dict) -> str | None:
    """The metric a set is judged by: ROUGE-L for open answers, else multiple-choice accuracy."""
    return next((key for key in ("rouge_l", "mc_accuracy") if key in metrics), None)


def transfer_summary(set_names: list[str], changes_by_model: dict[str, dict[str, dict]]) -> dict | None:
    """With two or more task sets (`set_names`, in order): the first is the training set's own
    test set ('own'), the others transfer sets; a warning per model (`changes_by_model`: each
    set's metric changes against the base) that beats the base on its own set but loses on
    another (it learned the training set's register, not the domain)."""
    if len(set_names) < 2:
        return None
    own, others = set_names[0], set_names[1:]
    warnings = []
    for model_name, changes in changes_by_model.items():
        key = _primary_metric(changes.get(own, {}))
        if key is None or changes[own][key] <= 0:
            continue
        lost = [
            (name, other_key, changes[name][other_key])
            for name in others
            if (other_key := _primary_metric(changes.get(name, {}))) and changes[name][other_key] < 0
        ]
        if lost:
            losses = "; ".join(f"{name}: {TASK_METRICS[k]} {delta:+.3f}" for name, k, delta in lost)
            warnings.append(
                f"{model_name} beats the base on its own test set ({own}: {TASK_METRICS[key]} "
                f"{changes[own][key]:+.3f}) but loses on {losses}: it learned the training set's style more than "
                "the domain (see 'Instruction tuning that transfers' in the README)."
            )
    return {"own": own, "others": others, "warnings": warnings}


def write_report(out_dir: Path, report: dict) -> dict[str, Path]:
    """report.json, report.md and report.html in `out_dir` (each written atomically)."""
    from lorafit.evaluation.pages import render_html, render_markdown
    from lorafit.evaluation.plots import report_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json_atomic(paths["report.json"], report)
    write_text_atomic(paths["report.md"], render_markdown(report))
    write_text_atomic(paths["report.html"], render_html(report, report_plots(report)))
    return paths


def metrics_records(metrics_path: Path) -> list[dict]:
    """A run's metrics.jsonl as records (none when it has no such file); a line cut by a crash is
    left out, the rest still a curve."""
    path = Path(metrics_path)
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_curves(metrics_path: Path) -> dict | None:
    """Training and validation loss by step from a run's metrics.jsonl (None when it has none)."""
    train, valid = [], []
    for record in metrics_records(metrics_path):
        # A skipped (non-finite) step has loss null: a gap in the curve, not a point.
        if isinstance(record.get("loss"), (int, float)) and "step" in record:
            train.append([record["step"], record["loss"]])
        if isinstance(record.get("valid_loss"), (int, float)) and "step" in record:
            valid.append([record["step"], record["valid_loss"]])
    return {"train": train, "valid": valid} if train or valid else None


def read_lora_health(metrics_path: Path, change_map: dict | None) -> dict | None:
    """The report's LoRA health: per module type, ‖ΔW‖ by step (metrics.jsonl's lora_norms
    events), the monitor's warnings, and the final adapter's change map (layers x types)."""
    curves: dict[str, list[list[float]]] = {}
    warnings: list[dict] = []
    for record in metrics_records(metrics_path):
        if record.get("event") == "lora_norms":
            for kind, values in (record.get("by_type") or {}).items():
                if isinstance(values.get("delta"), (int, float)):
                    curves.setdefault(kind, []).append([record["step"], values["delta"]])
        elif record.get("event") == "lora_warning":
            warnings.append({k: record.get(k) for k in ("step", "module", "kind", "message")})
    if not curves and not warnings and not change_map:
        return None
    return {"change_map": change_map, "curves": curves, "warnings": warnings}

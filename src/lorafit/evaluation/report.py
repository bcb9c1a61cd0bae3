"""The evaluation report: did the adaptation help, and what did it cost?

One dict with stable keys (`report.json`, documented in the README), rendered as `report.md` and
as a self-contained `report.html` whose plots are PNGs embedded in the page. The base model is
always `models[0]`; every change is relative to it. `lorafit train` and `lorafit eval` both fill
`ModelEvaluation`s and call `write_report`.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import __version__
from lorafit.artifacts import REPORT_FILES, RunSummary
from lorafit.compute.perplexity import LossResult
from lorafit.data.datasets import GENERAL_SAMPLE
from lorafit.data.pack import IGNORE_INDEX, PackedBlocks
from lorafit.io import write_json_atomic, write_text_atomic

REPORT_VERSION = 1
TASK_METRICS = {
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "mc_accuracy": "multiple-choice accuracy",
}


@dataclass
class ModelEvaluation:
    """What was measured of one model (the base, an adapter or a fully fine-tuned model)."""

    name: str
    kind: str  # "base", "lora" or "full"
    path: str | None = None
    domain: LossResult | None = None
    general: LossResult | None = None
    tasks: dict = field(default_factory=dict)  # answer_metrics() output (+ mc_accuracy, mc_count)
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
        entry["tasks_change"] = {
            name: model.tasks[name] - base.tasks[name]
            for name in TASK_METRICS
            if model is not base and name in model.tasks and name in base.tasks
        }
        entry["cost"] = dict(model.cost)
        entry["curves"] = model.curves
        entries.append(entry)
    return {
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


# --- tables shared by the Markdown and HTML pages --------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _with_change(value: float | None, change: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return _num(value, digits) + ("" if change is None else f" ({change:+.1f}%)")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _count(value: float | int | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _megabytes(value: float | None, unit: float) -> str:
    return "–" if value is None else f"{value * unit / 1e6:,.1f} MB"


def quality_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) for what the adaptation changed."""
    models = report["models"]
    rows = []
    if any(m["domain_ppl"] is not None for m in models):
        rows.append(("domain loss (nats/token)", [_num(m["domain_loss"], 4) for m in models]))
        rows.append(
            ("domain perplexity", [_with_change(m["domain_ppl"], m["domain_ppl_change_percent"]) for m in models])
        )
    if any(m["general_ppl"] is not None for m in models):
        rows.append(("general loss (nats/token)", [_num(m["general_loss"], 4) for m in models]))
        rows.append(
            (
                "general perplexity (forgetting)",
                [_with_change(m["general_ppl"], m["general_ppl_change_percent"]) for m in models],
            )
        )
    for key, label in TASK_METRICS.items():
        if any(key in m["tasks"] for m in models):
            cells = []
            for m in models:
                value = m["tasks"].get(key)
                delta = m["tasks_change"].get(key)
                cells.append(_num(value, 4) + ("" if delta is None else f" ({delta:+.4f})"))
            rows.append((label, cells))
    return rows


def cost_rows(report: dict) -> list[tuple[str, list[str]]]:
    models = report["models"]
    cost = [m["cost"] for m in models]

    def trainable(c: dict) -> str:
        if c.get("trainable_parameters") is None:
            return "–"
        percent = c.get("trainable_percent")
        return _count(c["trainable_parameters"]) + ("" if percent is None else f" ({percent:.2f}%)")

    return [
        ("training time", [_duration(c.get("train_seconds")) for c in cost]),
        ("tokens seen", [_count(c.get("train_tokens")) for c in cost]),
        ("training tokens/s", [_count(c.get("train_tokens_per_second")) for c in cost]),
        ("peak memory (training)", [_megabytes(c.get("peak_memory_mb"), 1e6) for c in cost]),
        ("trainable parameters", [trainable(c) for c in cost]),
        ("saved size", [_megabytes(c.get("saved_bytes"), 1.0) for c in cost]),
        ("evaluation tokens/s", [_count(c.get("eval_tokens_per_second")) for c in cost]),
    ]


def headline(report: dict) -> list[str]:
    """One sentence per adapter: the gain and the forgetting, in numbers."""
    lines = []
    for model in report["models"][1:]:
        parts = []
        if model["domain_ppl_change_percent"] is not None:
            parts.append(f"domain perplexity {model['domain_ppl_change_percent']:+.1f}%")
        change = model["general_ppl_change_percent"]
        if change is not None:
            verdict = "forgetting" if change > 0 else "no forgetting"
            parts.append(f"general-text perplexity {change:+.1f}% ({verdict})")
        for key in ("rouge_l", "token_f1", "mc_accuracy"):
            if key in model["tasks_change"]:
                parts.append(f"{TASK_METRICS[key]} {model['tasks_change'][key]:+.3f}")
        if parts:
            lines.append(f"{model['name']}: " + ", ".join(parts) + " vs the base model.")
    return lines


def data_lines(report: dict) -> list[str]:
    lines = []
    for key, label in (("domain", "domain text"), ("general", "general text"), ("tasks", "task records")):
        info = report["data"].get(key)
        if not info:
            continue
        files = ", ".join(info.get("files", [])) or "–"
        if key == "tasks":
            lines.append(f"{label}: {info['records']:,} records from {files}")
        else:
            lines.append(
                f"{label}: {info['tokens']:,} scored tokens in {info['blocks']:,} blocks of {info['seq_len']} "
                f"from {files}"
            )
    return lines


# --- Markdown ---------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in [label, *cells]) + " |" for label, cells in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    names = [m["name"] for m in report["models"]]
    header = ["", *names]
    out = [
        "# lorafit evaluation report",
        "",
        f"Base model: **{report['base_model'].get('name', '?')}** · lorafit {report['lorafit_version']} · "
        f"{report['created']}",
        "",
    ]
    out += [f"- {line}" for line in headline(report)] + [""]
    out += ["## Quality", "", _md_table(header, quality_rows(report)), ""]
    out += ["## Cost", "", _md_table(header, cost_rows(report)), ""]
    out += ["## Data", ""] + [f"- {line}" for line in data_lines(report)] + [""]
    if report["generations"]:
        out += ["## Generations (greedy)", ""]
        for number, row in enumerate(report["generations"], 1):
            out += [f"### Prompt {number}", "", "```text", row["prompt"], "```", ""]
            for name, text in zip(names, row["outputs"]):
                out += [f"**{name}**", "", "```text", text, "```", ""]
    return "\n".join(out).rstrip() + "\n"


# --- HTML -------------------------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } .headline li { margin: .2em 0; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .35em .8em; border: 1px solid #ddd; }
th { background: #f4f4f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots figure { margin: 0; }
.plots img { max-width: 100%; border: 1px solid #eee; }
.gen { display: grid; gap: .6em; } .gen pre { white-space: pre-wrap; background: #f7f7f9; padding: .6em;
       margin: .2em 0 0; border-radius: 4px; } .gen h4 { margin: .2em 0 0; }
"""


def _html_table(header: list[str], rows: list[tuple[str, list[str]]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr><th>" + html.escape(label) + "</th>" + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells)
        for label, cells in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(report: dict, plots: dict[str, str]) -> str:
    """A page with no outside references: `plots` maps a caption to a base64 PNG."""
    names = [m["name"] for m in report["models"]]
    header = ["", *names]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>lorafit evaluation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>lorafit evaluation report</h1>",
        f"<p class='meta'>Base model: <b>{html.escape(str(report['base_model'].get('name', '?')))}</b> · "
        f"lorafit {html.escape(report['lorafit_version'])} · {html.escape(report['created'])}</p>",
        "<ul class='headline'>" + "".join(f"<li>{html.escape(line)}</li>" for line in headline(report)) + "</ul>",
        "<h2>Quality</h2>",
        _html_table(header, quality_rows(report), "quality"),
    ]
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for caption, png in plots.items():
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'></figure>")
        parts.append("</div>")
    parts += ["<h2>Cost</h2>", _html_table(header, cost_rows(report), "cost")]
    parts += ["<h2>Data</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in data_lines(report)] + ["</ul>"]
    if report["generations"]:
        parts.append("<h2>Generations (greedy)</h2>")
        for number, row in enumerate(report["generations"], 1):
            parts.append(f"<section class='gen'><h3>Prompt {number}</h3><pre>{html.escape(row['prompt'])}</pre>")
            for name, text in zip(names, row["outputs"]):
                parts.append(f"<div><h4>{html.escape(name)}</h4><pre>{html.escape(text)}</pre></div>")
            parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, report: dict) -> dict[str, Path]:
    """report.json, report.md and report.html in `out_dir` (each written atomically)."""
    from lorafit.evaluation.plots import report_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json_atomic(paths["report.json"], report)
    write_text_atomic(paths["report.md"], render_markdown(report))
    write_text_atomic(paths["report.html"], render_html(report, report_plots(report)))
    return paths


def read_curves(metrics_path: Path) -> dict | None:
    """Training and validation loss by step from a run's metrics.jsonl (None when it has none)."""
    if not Path(metrics_path).is_file():
        return None
    train, valid = [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest is still a curve
        # A skipped (non-finite) step has loss null: a gap in the curve, not a point.
        if isinstance(record.get("loss"), (int, float)) and "step" in record:
            train.append([record["step"], record["loss"]])
        if isinstance(record.get("valid_loss"), (int, float)) and "step" in record:
            valid.append([record["step"], record["valid_loss"]])
    return {"train": train, "valid": valid} if train or valid else None

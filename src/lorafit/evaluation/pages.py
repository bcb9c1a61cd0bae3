"""The report as pages: report.md and a self-contained report.html (plots embedded as PNGs), and
the tables the terminal prints, all from report.json's dict (`lorafit.evaluation.report`)."""

from __future__ import annotations

import html

from lorafit.evaluation.metrics import TASK_METRICS

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
        transfer = report.get("transfer")
        if transfer:
            sets = model["task_sets_change"]
            moves = [
                f"{name} "
                + ", ".join(
                    f"{TASK_METRICS[key]} {sets[name][key]:+.3f}"
                    for key in ("rouge_l", "token_f1", "mc_accuracy")
                    if key in sets.get(name, {})
                )
                for name in transfer["others"]
            ]
            lines.append(
                f"{model['name']}: transfer (task sets it was not trained in the style of): " + "; ".join(moves) + "."
            )
    return lines


def transfer_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) per task set and metric: the own test set first, then the others."""
    transfer = report.get("transfer")
    if not transfer:
        return []
    rows = []
    for name in [transfer["own"], *transfer["others"]]:
        role = "own test set" if name == transfer["own"] else "transfer"
        for key in ("rouge_l", "token_f1", "mc_accuracy"):
            if not any(key in m["task_sets"].get(name, {}) for m in report["models"]):
                continue
            cells = []
            for m in report["models"]:
                value = m["task_sets"].get(name, {}).get(key)
                delta = m["task_sets_change"].get(name, {}).get(key)
                cells.append(_num(value, 4) + ("" if delta is None else f" ({delta:+.4f})"))
            rows.append((f"{name} ({role}): {TASK_METRICS[key]}", cells))
    return rows


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


def lora_health_lines(health: dict) -> list[str]:
    """What the change map says in words: the most and least changed module types and layers."""
    changes = health.get("change_map")
    if not changes:
        return []
    cells = [
        (value, layer, kind)
        for layer, row in zip(changes["layers"], changes["relative"])
        for kind, value in zip(changes["types"], row)
        if value is not None
    ]
    if not cells:
        return []
    top, low = max(cells), min(cells)
    return [
        f"‖ΔW‖ / ‖W‖ of the final adapter over {len(changes['layers'])} layers x {len(changes['types'])} module "
        f"types: largest {top[0]:.4f} (layer {top[1]} {top[2]}), smallest {low[0]:.4f} (layer {low[1]} {low[2]}). "
        "The heat map under Plots shows every module."
    ]


def lora_warning_lines(health: dict) -> list[str]:
    return [f"step {w['step']}: {w['module']}: {w['message']}" for w in health.get("warnings") or []]


def lora_health_markdown(health: dict | None) -> list[str]:
    if not health:
        return []
    out = ["## LoRA health", ""]
    out += [f"- {line}" for line in lora_health_lines(health)]
    out += [f"- **Warning:** {line}" for line in lora_warning_lines(health)]
    if len(out) == 2:
        out.append("- No module flagged.")
    return out + [""]


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
    if report.get("transfer"):
        out += ["## Transfer", ""] + [f"- **Warning:** {w}" for w in report["transfer"]["warnings"]]
        out += ["", _md_table(header, transfer_rows(report)), ""]
    out += lora_health_markdown(report.get("lora_health"))
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
.meta { color: #666; } .warning { color: #9a3412; font-weight: 600; } .headline li { margin: .2em 0; }
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
    if report.get("transfer"):
        parts.append("<h2>Transfer</h2>")
        parts += [f"<p class='warning'>Warning: {html.escape(w)}</p>" for w in report["transfer"]["warnings"]]
        parts.append(_html_table(header, transfer_rows(report), "transfer"))
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for caption, png in plots.items():
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'></figure>")
        parts.append("</div>")
    health = report.get("lora_health")
    if health:
        parts.append("<h2 id='lora-health'>LoRA health</h2>")
        parts += [f"<p>{html.escape(line)}</p>" for line in lora_health_lines(health)]
        parts += [f"<p class='warning'>Warning: {html.escape(w)}</p>" for w in lora_warning_lines(health)]
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

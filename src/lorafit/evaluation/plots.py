"""The report's plots, drawn with matplotlib and returned as base64 PNGs.

matplotlib's object API (`Figure`) draws straight to memory: no display, no pyplot state, and
the caller's own matplotlib backend (a notebook's, say) is left alone."""

from __future__ import annotations

import base64
import io

BASE_COLOUR = "#8e8e93"
ADAPTER_COLOURS = ["#0a84ff", "#ff9f0a", "#30d158", "#bf5af2", "#ff375f", "#64d2ff", "#ac8e68"]


def _figure(width: float, height: float = 3.8):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colours(count: int) -> list[str]:
    return [BASE_COLOUR] + [ADAPTER_COLOURS[i % len(ADAPTER_COLOURS)] for i in range(count - 1)]


def _smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, bias-corrected so the start is not pulled to zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def loss_curves(models: list[dict]) -> str | None:
    trained = [(i, m) for i, m in enumerate(models) if m.get("curves")]
    if not trained:
        return None
    colours = _colours(len(models))
    figure, axes = _figure(6.4)
    for index, model in trained:
        train, valid = model["curves"].get("train") or [], model["curves"].get("valid") or []
        colour = colours[index]
        if train:
            steps, losses = zip(*train)
            axes.plot(steps, losses, color=colour, alpha=0.25, linewidth=1)
            axes.plot(steps, _smoothed(list(losses)), color=colour, linewidth=1.8, label=f"{model['name']} train")
        if valid:
            steps, losses = zip(*valid)
            axes.plot(steps, losses, color=colour, linestyle="--", marker="o", label=f"{model['name']} validation")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title("Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _bars(models: list[dict], key: str, title: str, ylabel: str, annotate_change: str | None) -> str | None:
    shown = [(i, m) for i, m in enumerate(models) if m.get(key) is not None]
    if not shown:
        return None
    colours = _colours(len(models))
    figure, axes = _figure(max(3.6, 1.3 * len(shown) + 1.5))
    positions = range(len(shown))
    bars = axes.bar(positions, [m[key] for _, m in shown], color=[colours[i] for i, _ in shown])
    axes.set_xticks(list(positions), [m["name"] for _, m in shown], rotation=20 if len(shown) > 3 else 0)
    for bar, (_, model) in zip(bars, shown):
        change = model.get(annotate_change) if annotate_change else None
        label = f"{bar.get_height():.2f}" + ("" if change is None else f"\n{change:+.1f}%")
        axes.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.margins(y=0.2)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def forgetting_bars(models: list[dict]) -> str | None:
    adapters = [(i, m) for i, m in enumerate(models) if i and m.get("general_ppl_change_percent") is not None]
    if not adapters:
        return None
    colours = _colours(len(models))
    figure, axes = _figure(max(3.6, 1.3 * len(adapters) + 1.5))
    changes = [m["general_ppl_change_percent"] for _, m in adapters]
    bars = axes.bar(range(len(adapters)), changes, color=[colours[i] for i, _ in adapters])
    axes.set_xticks(list(range(len(adapters))), [m["name"] for _, m in adapters])
    for bar, change in zip(bars, changes):
        axes.annotate(
            f"{change:+.1f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom" if change >= 0 else "top",
            fontsize=8,
        )
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("general-text perplexity change vs base (%)")
    axes.set_title("Forgetting (higher = more forgotten)")
    axes.margins(y=0.25)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def lora_change_heatmap(health: dict | None) -> str | None:
    """Layers (rows) x module types (columns): the final ‖ΔW‖ / ‖W‖ of each adapted module."""
    changes = (health or {}).get("change_map")
    if not changes:
        return None
    import numpy as np

    layers, kinds = changes["layers"], changes["types"]
    values = np.array([[np.nan if v is None else v for v in row] for row in changes["relative"]], dtype=float)
    figure, axes = _figure(max(4.0, 1.0 + 0.9 * len(kinds)), max(3.0, 0.9 + 0.22 * len(layers)))
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    step = max(1, len(layers) // 16)
    axes.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]], fontsize=8)
    axes.set_ylabel("layer")
    axes.set_title("Where the adapter changed the model: ‖ΔW‖ / ‖W‖")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return _png(figure)


def lora_norm_curves(health: dict | None) -> str | None:
    """‖ΔW‖ by step, one line per module type (all layers of the type together)."""
    curves = (health or {}).get("curves")
    if not curves:
        return None
    figure, axes = _figure(6.4)
    for index, (kind, points) in enumerate(curves.items()):
        steps, norms = zip(*points)
        colour = ADAPTER_COLOURS[index % len(ADAPTER_COLOURS)]
        axes.plot(steps, norms, color=colour, marker="." if len(points) < 30 else None, label=kind)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("‖ΔW‖ (Frobenius, all layers)")
    axes.set_title("LoRA weight change by module type")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def report_plots(report: dict) -> dict[str, str]:
    """Caption -> base64 PNG for every plot the report's numbers allow."""
    models = report["models"]
    plots = {
        "Training and validation loss": loss_curves(models),
        "Domain perplexity (lower is better)": _bars(
            models, "domain_ppl", "Domain perplexity", "perplexity", "domain_ppl_change_percent"
        ),
        "General-text perplexity": _bars(
            models, "general_ppl", "General-text perplexity", "perplexity", "general_ppl_change_percent"
        ),
        "Forgetting": forgetting_bars(models),
        "LoRA change by layer and module type": lora_change_heatmap(report.get("lora_health")),
        "LoRA weight change by step": lora_norm_curves(report.get("lora_health")),
    }
    return {caption: png for caption, png in plots.items() if png is not None}

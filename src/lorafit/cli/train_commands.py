"""`lorafit train` and its printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lorafit.cli.app import _fail, console
from lorafit.errors import LorafitError, UsageError


def train(
    config: Annotated[Path, typer.Argument(help="Run configuration (YAML); see configs/.")],
    out: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Run folder (default: the config's 'out').")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a key: --set train.lr=1e-4 (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous run in --out.")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="[CHECKPOINT]",
            help="Continue an interrupted run exactly: alone, from the newest OUT/checkpoints/step-N; "
            "or from the given checkpoint folder.",
        ),
    ] = None,
    ignore_changes: Annotated[
        bool, typer.Option(help="Resume even though the config, data or base model changed.")
    ] = False,
    launcher: Annotated[
        str,
        typer.Option(
            help="'none' trains in this process; 'accelerate' starts --num-processes processes with accelerate "
            "launch (torchrun), the same config unchanged."
        ),
    ] = "none",
    num_processes: Annotated[
        int, typer.Option(help="Processes for --launcher accelerate (one per GPU; on a CPU, cores are shared).")
    ] = 2,
    distributed: Annotated[
        str, typer.Option(help="Engine for --launcher accelerate: ddp, fsdp, deepspeed-zero2 or deepspeed-zero3.")
    ] = "ddp",
    accelerate_config: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="An accelerate config (e.g. configs/distributed/*.yaml) instead of --distributed's flags.",
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter: measure validation perplexity, train, measure again, save."""
    from lorafit.api import train as train_run

    if launcher not in ("none", "accelerate"):
        raise UsageError(f"--launcher {launcher}: use 'none' or 'accelerate'.")
    if launcher == "accelerate":
        from lorafit.training.launch import accelerate_command, launch

        train_args = [str(config), *(["--out", str(out)] if out else [])]
        train_args += [arg for value in set_ or [] for arg in ("--set", value)]
        train_args += ["--overwrite"] * overwrite + ["--ignore-changes"] * ignore_changes
        train_args += ["--resume", resume] if resume else []
        command = accelerate_command(train_args, num_processes, distributed, accelerate_config)
        engine = f"as {accelerate_config} says" if accelerate_config else distributed
        console.print(f"[bold]launching[/] {num_processes} processes ({engine}): {' '.join(command)}")
        status = launch(command)
        if status:
            raise typer.Exit(status if status > 0 else 128 - status)
        return
    try:
        result = train_run(
            config, out, set_ or [], overwrite=overwrite, resume=resume, ignore_changes=ignore_changes, console=console
        )
    except LorafitError as exc:
        _fail(exc)
        return
    if result.main_process:
        print_run_summary(result.summary, result.out_dir)


def print_run_summary(summary: dict, out_dir: Path) -> None:
    table = Table(title="result", show_header=True)
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    table.add_row("validation perplexity", f"{summary['valid_ppl_before']:.3f}", f"{summary['valid_ppl_after']:.3f}")
    if "general_ppl_before" in summary:
        table.add_row(
            "general-text perplexity (forgetting)",
            f"{summary['general_ppl_before']:.3f}",
            f"{summary['general_ppl_after']:.3f}",
        )
    console.print(table)
    console.print(
        f"perplexity change {summary['valid_ppl_change_percent']:+.1f}%  |  {summary['train_tokens']:,} tokens at "
        f"{summary['tokens_per_second']:.0f} tok/s  |  peak RSS {summary.get('peak_rss_mb', 0):.0f} MB  |  "
        f"wall {summary.get('wall_seconds', 0):.0f} s"
    )
    if summary.get("tasks"):
        console.print(task_metrics_table(summary["tasks"]))
    transfer = summary.get("transfer")
    if transfer:
        for name in [transfer["own"], *transfer["others"]]:
            role = "own test set" if name == transfer["own"] else "transfer"
            sides = {side: summary["task_sets"][side].get(name, {}) for side in ("base", "adapter")}
            console.print(task_metrics_table(sides, f"{name} ({role})"))
        for warning in transfer["warnings"]:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if summary.get("generations"):
        side = Table(title="generations (greedy)", show_header=True, show_lines=True)
        side.add_column("prompt", ratio=1)
        side.add_column("base", ratio=1)
        side.add_column("adapter", ratio=1)
        for row in summary["generations"]:
            side.add_row(row["prompt"], row["base"], row["adapter"])
        console.print(side)
    kind = "model" if summary.get("method") == "full" else "adapter"
    saved = summary.get("saved_to", out_dir / kind)
    size = f" ({summary['saved_bytes'] / 1e6:.1f} MB)" if summary.get("saved_bytes") else ""
    console.print(f"{kind}: {saved}{size}   summary: {out_dir / 'summary.json'}   metrics: {out_dir / 'metrics.jsonl'}")
    if (out_dir / "report.html").is_file():
        console.print(f"report: {out_dir / 'report.html'} (and report.md, report.json)")


def task_metrics_table(metrics: dict, title: str = "task metrics") -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    for name in ("exact_match", "token_f1", "rouge_l", "bleu", "mc_accuracy"):
        if name in metrics["adapter"]:
            base = metrics["base"].get(name)
            table.add_row(name, "-" if base is None else f"{base:.4f}", f"{metrics['adapter'][name]:.4f}")
    return table

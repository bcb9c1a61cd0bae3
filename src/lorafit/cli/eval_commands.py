"""`lorafit eval` and the report's tables in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lorafit.cli.app import _fail, console
from lorafit.errors import LorafitError, UsageError
from lorafit.options import default_of


def evaluate_models(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for report.json, report.md, report.html.")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            metavar="[NAME=]PATH",
            help="A run folder, its adapter/ or model/, or a PEFT adapter folder (repeatable: one column each).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Base model (folder, .gguf or hub id; '' = embedded default). Default: the adapter's."),
    ] = None,
    domain: Annotated[
        list[Path] | None,
        typer.Option(
            help="Held-out domain text or instruction files (repeatable). Default: the run's validation data."
        ),
    ] = None,
    general: Annotated[
        list[str] | None,
        typer.Option(help="General-text files for forgetting (repeatable). Default: lorafit's general-English sample."),
    ] = None,
    no_general: Annotated[bool, typer.Option("--no-general", help="Skip the forgetting measurement.")] = False,
    tasks: Annotated[
        list[Path] | None,
        typer.Option(
            help="Instruction/QA test files for task metrics (repeatable); each also gets its own rows, the first as "
            "the adapters' own test set, the others as transfer sets (a warning when an adapter gains on the first "
            "and loses on another)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Text file, one generation prompt per line. Default: sampled from --tasks.")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Context of the perplexity blocks. Default: the run's train.seq_len.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Perplexity blocks evaluated together.")] = default_of(
        "options.eval_batch_size"
    ),
    generate_batch_size: Annotated[
        int, typer.Option(help="Answers decoded together (continuous batching): task answers, generations.")
    ] = default_of("eval.batch_size"),
    max_blocks: Annotated[int, typer.Option(help="Score only the first N blocks of each text (0 = all).")] = (
        default_of("options.max_blocks")
    ),
    task_max_examples: Annotated[
        int, typer.Option(help="Score only the first N task records of each --tasks file (0 = all).")
    ] = (default_of("eval.task_max_examples")),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per side-by-side prompt.")] = default_of(
        "eval.max_new_tokens"
    ),
    task_max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per task answer.")] = default_of(
        "eval.task_max_new_tokens"
    ),
    precision: Annotated[
        str | None, typer.Option(help="auto, bf16, fp16 or fp32. Default: the run's train.precision.")
    ] = None,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Evaluate adapters even if they record other base weights.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a report lorafit wrote into --out before.")] = False,
) -> None:
    """Measure the base model and adapters on the same data: domain perplexity, forgetting, task
    metrics, generations and cost, in one report (report.json, report.md, report.html)."""
    from lorafit.api import evaluate

    try:
        result = evaluate(
            list(adapter or []),
            out,
            base=base,
            domain=domain,
            general=general,
            no_general=no_general,
            tasks=tasks,
            prompts=read_prompt_lines(prompts) if prompts is not None else None,
            seq_len=seq_len,
            batch_size=batch_size,
            generate_batch_size=generate_batch_size,
            max_blocks=max_blocks,
            task_max_examples=task_max_examples,
            max_new_tokens=max_new_tokens,
            task_max_new_tokens=task_max_new_tokens,
            precision=precision,
            allow_base_mismatch=allow_base_mismatch,
            overwrite=overwrite,
            console=console,
        )
    except LorafitError as exc:
        _fail(exc)
        return
    print_report(result.report)
    console.print("report: " + "  ".join(str(path) for path in result.paths.values()))


def read_prompt_lines(path: Path) -> list[str]:
    """--prompts: one prompt per non-empty line of a UTF-8 text file."""
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise UsageError(f"--prompts {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    if not lines:
        raise UsageError(f"--prompts {path}: the file holds no prompt; write one per line.")
    return lines


def print_report(report: dict) -> None:
    """The report's tables in the terminal (the same rows as report.md)."""
    from lorafit.evaluation.pages import cost_rows, headline, quality_rows, transfer_rows

    names = [m["name"] for m in report["models"]]
    tables = (("quality", quality_rows(report)), ("transfer", transfer_rows(report)), ("cost", cost_rows(report)))
    for title, rows in tables:
        if not rows:
            continue
        table = Table(title=title, show_header=True)
        table.add_column("")
        for name in names:
            table.add_column(name, justify="right")
        for label, cells in rows:
            table.add_row(label, *cells)
        console.print(table)
    for line in headline(report):
        console.print(line, highlight=False)
    for warning in (report.get("transfer") or {}).get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)

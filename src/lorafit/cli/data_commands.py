"""`lorafit prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorafit.cli.app import _fail, console
from lorafit.errors import LorafitError
from lorafit.options import default_of


def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Files or folders of .html/.htm/.md/.txt/.pdf/.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl, valid.jsonl and stats.json.")],
    text_field: Annotated[str, typer.Option(help="Field holding the text in JSONL records.")] = default_of(
        "data.text_field"
    ),
    min_chars: Annotated[int, typer.Option(help="Drop documents shorter than this.")] = default_of("data.min_chars"),
    near_dup_threshold: Annotated[float, typer.Option(help="Jaccard threshold for near-duplicates.")] = default_of(
        "data.near_dup_threshold"
    ),
    valid_ratio: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = default_of(
        "data.valid_ratio"
    ),
    exclude: Annotated[
        list[Path] | None, typer.Option(help="Evaluation JSONL to decontaminate against (repeatable).")
    ] = None,
    exclude_ngram: Annotated[int, typer.Option(help="n-gram length (words) for decontamination.")] = default_of(
        "data.exclude_ngram"
    ),
    base: Annotated[str, typer.Option(help="Model whose tokenizer counts tokens (empty = embedded default).")] = (
        default_of("model.base")
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace data an earlier lorafit prepare wrote into --out.")] = False,
    workers: Annotated[
        int, typer.Option(help="Processes that read, clean and tokenize (0: one per available core).")
    ] = default_of("data.workers"),
) -> None:
    """Clean, de-duplicate, decontaminate and split raw documents into train/valid JSONL."""
    from lorafit.api import prepare as prepare_data

    try:
        result = prepare_data(
            inputs,
            out,
            text_field=text_field,
            min_chars=min_chars,
            near_dup_threshold=near_dup_threshold,
            valid_ratio=valid_ratio,
            exclude=exclude,
            exclude_ngram=exclude_ngram,
            base=base,
            overwrite=overwrite,
            console=console,
            workers=workers,
        )
    except LorafitError as exc:
        _fail(exc)
        return
    for problem in result.problems:
        console.print(f"[yellow]skipped[/] {problem['where']}: {problem['message']}", highlight=False)
    console.print(stats_table(result.stats))
    console.print(f"wrote {result.paths['train']}, {result.paths['valid']}, {result.paths['stats']}")


def stats_table(stats: dict) -> Table:
    table = Table(title="prepared data", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key == "removed":
            for reason, count in value.items():
                table.add_row(f"removed: {reason}", f"{count:,}")
        elif isinstance(value, (int, float)):
            table.add_row(key, f"{value:,}")
    return table

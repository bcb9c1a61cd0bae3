"""`lorafit prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorafit.cli.app import _fail, console
from lorafit.errors import LorafitError


def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Files or folders of .html/.htm/.md/.txt/.pdf/.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl, valid.jsonl and stats.json.")],
    text_field: Annotated[str, typer.Option(help="Field holding the text in JSONL records.")] = "text",
    min_chars: Annotated[int, typer.Option(help="Drop documents shorter than this.")] = 200,
    near_dup_threshold: Annotated[float, typer.Option(help="Jaccard threshold for near-duplicates.")] = 0.8,
    valid_ratio: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.1,
    exclude: Annotated[
        list[Path] | None, typer.Option(help="Evaluation JSONL to decontaminate against (repeatable).")
    ] = None,
    exclude_ngram: Annotated[int, typer.Option(help="n-gram length (words) for decontamination.")] = 13,
    base: Annotated[str, typer.Option(help="Model whose tokenizer counts tokens (empty = embedded default).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace data an earlier lorafit prepare wrote into --out.")] = False,
) -> None:
    """Clean, de-duplicate, decontaminate and split raw documents into train/valid JSONL."""
    from lorafit.data.prepare import PrepareOptions, add_token_counts, prepare_documents, write_prepared
    from lorafit.data.tokenize import count_tokens
    from lorafit.model.load import load_tokenizer, resolve_base
    from lorafit.options import check_options
    from lorafit.outputs import check_output_folder, output_folder

    try:
        check_options(
            {
                "--min-chars": ("data.min_chars", min_chars),
                "--near-dup-threshold": ("data.near_dup_threshold", near_dup_threshold),
                "--valid-ratio": ("data.valid_ratio", valid_ratio),
                "--exclude-ngram": ("data.exclude_ngram", exclude_ngram),
            }
        )
        check_output_folder(out, "prepared", overwrite)  # before any work
        options = PrepareOptions(
            text_field=text_field,
            min_chars=min_chars,
            near_dup_threshold=near_dup_threshold,
            valid_ratio=valid_ratio,
            exclude=[str(p) for p in exclude or []],
            exclude_ngram=exclude_ngram,
            setting_names=CLI_SETTINGS,
        )
        with output_folder(out, "prepared", "lorafit prepare"):
            with console.status("reading and cleaning documents..."):
                prepared = prepare_documents(inputs, options)
            tokenizer = load_tokenizer(resolve_base(base))
            add_token_counts(prepared, lambda texts: count_tokens(texts, tokenizer))
            paths = write_prepared(prepared, out)
    except LorafitError as exc:
        _fail(exc)
        return
    for problem in prepared.problems.items:
        console.print(f"[yellow]skipped[/] {problem.where}: {problem.message}", highlight=False)
    console.print(stats_table(prepared.stats))
    console.print(f"wrote {paths['train']}, {paths['valid']}, {paths['stats']}")


# How the advice in data errors names a setting when `lorafit prepare` was run (config keys otherwise).
CLI_SETTINGS = {
    "data.min_chars": "--min-chars",
    "data.text_field": "--text-field",
    "data.near_dup_threshold": "--near-dup-threshold",
    "data.exclude": "--exclude",
    "data.train": "the inputs",
}


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

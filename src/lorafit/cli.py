"""The `lorafit` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorafit import __version__
from lorafit.config import field_reference
from lorafit.errors import LorafitError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Adapt Llama-family language models to a domain with LoRA.",
)
console = Console()
_debug = False


def _fields_help() -> str:
    lines = ["Config keys (YAML sections, or --set KEY=VALUE):\n\n"]
    for key, default, description in field_reference():
        lines.append(f"  {key} (default {default}): {description}\n\n")
    return "".join(lines)


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug or bool(os.environ.get("LORAFIT_DEBUG"))
    if version:
        console.print(f"lorafit {__version__}")
        raise typer.Exit()
    logging.basicConfig(level=logging.INFO if _debug else logging.WARNING, format="%(message)s")
    if not _debug:
        # Deprecation notices from the libraries underneath are for us, not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # transformers' own progress bars and advice are noise in our output.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(exc: LorafitError) -> None:
    if _debug:
        raise exc
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@app.command()
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
) -> None:
    """Clean, de-duplicate, decontaminate and split raw documents into train/valid JSONL."""
    from lorafit.data.prepare import PrepareOptions, add_token_counts, prepare_documents, write_prepared
    from lorafit.data.tokenize import count_tokens
    from lorafit.model.load import load_tokenizer, resolve_base

    try:
        if not 0.0 <= valid_ratio < 1.0:
            raise UsageError("--valid-ratio must be at least 0 and below 1.")
        options = PrepareOptions(
            text_field=text_field,
            min_chars=min_chars,
            near_dup_threshold=near_dup_threshold,
            valid_ratio=valid_ratio,
            exclude=[str(p) for p in exclude or []],
            exclude_ngram=exclude_ngram,
        )
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


@app.command(epilog=_fields_help())
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
) -> None:
    """Train a LoRA adapter: measure validation perplexity, train, measure again, save."""
    from lorafit.config import load_config
    from lorafit.train.run import run_training

    try:
        run_config = load_config(config, set_ or [])
        result = run_training(
            run_config, out, overwrite=overwrite, console=console, resume=resume, ignore_changes=ignore_changes
        )
    except LorafitError as exc:
        _fail(exc)
        return
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


def task_metrics_table(metrics: dict) -> Table:
    table = Table(title="task metrics", show_header=True)
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    for name in ("exact_match", "token_f1", "rouge_l", "bleu", "mc_accuracy"):
        if name in metrics["adapter"]:
            base = metrics["base"].get(name)
            table.add_row(name, "-" if base is None else f"{base:.4f}", f"{metrics['adapter'][name]:.4f}")
    return table


@app.command(name="eval")
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
        list[Path] | None, typer.Option(help="Instruction/QA test files for task metrics (repeatable).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Text file, one generation prompt per line. Default: sampled from --tasks.")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Context of the perplexity blocks. Default: the run's train.seq_len.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Blocks (and prompts) evaluated together.")] = 8,
    max_blocks: Annotated[int, typer.Option(help="Score only the first N blocks of each text (0 = all).")] = 0,
    task_max_examples: Annotated[int, typer.Option(help="Score only the first N task records (0 = all).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per side-by-side prompt.")] = 48,
    task_max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per task answer.")] = 128,
    precision: Annotated[
        str | None, typer.Option(help="auto, bf16 or fp32. Default: the run's train.precision.")
    ] = None,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Evaluate adapters even if they record other base weights.")
    ] = False,
) -> None:
    """Measure the base model and adapters on the same data: domain perplexity, forgetting, task
    metrics, generations and cost, in one report (report.json, report.md, report.html)."""
    from lorafit.data.datasets import GENERAL_SAMPLE
    from lorafit.evaluate.run import EvalRequest, run_evaluation

    try:
        if precision not in {None, "auto", "bf16", "fp32"}:
            raise UsageError(f"--precision {precision}: use auto, bf16 or fp32.")
        if batch_size < 1 or max_blocks < 0 or task_max_examples < 0:
            raise UsageError("--batch-size must be at least 1; --max-blocks and --task-max-examples at least 0.")
        if not adapter and base is None:
            raise UsageError("Name at least one --adapter (or --base alone to evaluate a base model).")
        prompt_lines: list[str] = []
        if prompts is not None:
            if not prompts.is_file():
                raise UsageError(f"--prompts {prompts}: no such file.")
            prompt_lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        request = EvalRequest(
            out=out,
            adapters=list(adapter or []),
            base=base,
            domain=[str(p) for p in domain or []],
            general=[] if no_general else list(general or [GENERAL_SAMPLE]),
            tasks=[str(p) for p in tasks or []],
            prompts=prompt_lines,
            seq_len=seq_len,
            batch_size=batch_size,
            max_blocks=max_blocks,
            task_max_examples=task_max_examples,
            max_new_tokens=max_new_tokens,
            task_max_new_tokens=task_max_new_tokens,
            precision=precision,
            allow_base_mismatch=allow_base_mismatch,
        )
        result = run_evaluation(request, console)
    except LorafitError as exc:
        _fail(exc)
        return
    print_report(result.report)
    console.print("report: " + "  ".join(str(path) for path in result.paths.values()))


def print_report(report: dict) -> None:
    """The report's tables in the terminal (the same rows as report.md)."""
    from lorafit.evaluate.report import cost_rows, headline, quality_rows

    names = [m["name"] for m in report["models"]]
    for title, rows in (("quality", quality_rows(report)), ("cost", cost_rows(report))):
        table = Table(title=title, show_header=True)
        table.add_column("")
        for name in names:
            table.add_column(name, justify="right")
        for label, cells in rows:
            table.add_row(label, *cells)
        console.print(table)
    for line in headline(report):
        console.print(line, highlight=False)


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(metavar="RUN_OR_ADAPTER", help="A run folder or a PEFT adapter folder.")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the merged transformers model.")],
    dtype: Annotated[str, typer.Option(help="Weights of the merged model: f32, bf16 or f16.")] = "bf16",
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the one the adapter records in lorafit.json).")
    ] = None,
    max_shard_mb: Annotated[int, typer.Option(help="Largest safetensors shard, in MB.")] = 2048,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Merge even if the adapter records other base weights.")
    ] = False,
) -> None:
    """Merge a LoRA adapter into its base: a plain transformers model folder (safetensors, config,
    tokenizer and chat template), streamed tensor by tensor."""
    from lorafit.adapters.merge import merge_adapter

    try:
        if max_shard_mb < 1:
            raise UsageError("--max-shard-mb must be at least 1.")
        result = merge_adapter(
            adapter,
            out,
            dtype=dtype,
            base=base,
            allow_base_mismatch=allow_base_mismatch,
            overwrite=overwrite,
            max_shard_bytes=max_shard_mb * 1024**2,
        )
    except LorafitError as exc:
        _fail(exc)
        return
    s = result.summary
    console.print(
        f"merged {s['merged_modules']} modules of {s['adapter']} into {s['base']} ({s['dtype']}): "
        f"{s['bytes'] / 1e6:,.1f} MB in {len(s['files'])} file(s), {s['seconds']:.1f} s, "
        f"peak RSS {s['peak_rss_mb']:,.0f} MB -> {result.out_dir}",
        highlight=False,
    )


@app.command()
def export(
    adapter: Annotated[str, typer.Argument(metavar="RUN_OR_ADAPTER", help="A run folder or a PEFT adapter folder.")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The .gguf file to write.")],
    format_: Annotated[str, typer.Option("--format", help="Export format (gguf).")] = "gguf",
    type_: Annotated[str, typer.Option("--type", help="f32, f16, bf16, q8_0 or q4_k_m.")] = "f16",
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter records).")] = None,
    verify: Annotated[
        bool, typer.Option(help="Check the file in llama.cpp against transformers (needs llama-cpp-python).")
    ] = True,
    pre_tokenizer: Annotated[
        str | None, typer.Option(help="llama.cpp pre-tokenizer name when lorafit cannot tell (llama-bpe, smollm).")
    ] = None,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Export even if the adapter records other base weights.")
    ] = False,
    adapter_only: Annotated[
        bool, typer.Option(help="Write the adapter alone as a llama.cpp LoRA GGUF (for --lora over the base's GGUF).")
    ] = False,
) -> None:
    """Export an adapter merged into its base (or a fully fine-tuned run) as GGUF for llama.cpp and
    Ollama, with a Modelfile beside it; checked in llama.cpp when llama-cpp-python is installed."""
    from lorafit.adapters.export import export_gguf

    try:
        if format_ != "gguf":
            raise UsageError(f"--format {format_}: lorafit exports gguf (for safetensors, use lorafit merge).")
        result = export_gguf(
            adapter,
            out,
            type_,
            base,
            verify,
            pre_tokenizer=pre_tokenizer,
            allow_base_mismatch=allow_base_mismatch,
            adapter_only=adapter_only,
        )
    except LorafitError as exc:
        _fail(exc)
        return
    s = result.summary
    details = [s["type"], f"{s['bytes'] / 1e6:,.1f} MB"]
    if "pre_tokenizer" in s:
        details += [
            f"pre-tokenizer {s['pre_tokenizer']}",
            f"chat template {'included' if s['chat_template'] else 'none'}",
        ]
    console.print(f"wrote {result.file} ({', '.join(details)}); Modelfile: {result.modelfile}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    check = result.verification
    if check:
        verdict = "[green]passed[/]" if check["passed"] else "[bold red]FAILED[/]"
        console.print(
            f"llama.cpp check {verdict}: token ids equal {check['token_ids_equal']}, top-1 agreement "
            f"{check['top1_agreement']:.4f}, max logit diff {check['max_logit_diff']:.4f}, perplexity "
            f"{check['ppl_transformers']:.4f} (transformers) vs {check['ppl_llama_cpp']:.4f} (llama.cpp, "
            f"{check['ppl_diff_percent']:+.2f}%), chat answer equal {check['chat_answer_equal']}",
            highlight=False,
        )
        if not check["passed"]:
            raise typer.Exit(1)


CHAT_HELP = (
    "/use NAME  switch adapter (no reload) · /base  the base model · /list · "
    "/mix NEW A=0.5 B=0.5 [cat|linear|svd]  combine adapters · /save NAME DIR · /reset  new conversation · /quit"
)


@app.command()
def chat(
    adapter: Annotated[
        list[str], typer.Option("--adapter", metavar="[NAME=]PATH", help="Adapter or run folder (repeatable).")
    ],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapters record).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer (greedy).")] = 256,
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32.")] = "auto",
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Load adapters even if they record other base weights.")
    ] = False,
) -> None:
    """Chat with one base model and several adapters, switching between them without reloading."""
    from lorafit.adapters.switch import AdapterSession, parse_named

    try:
        session = AdapterSession(parse_named(adapter), base, precision, allow_base_mismatch)
    except LorafitError as exc:
        _fail(exc)
        return
    console.print(f"loaded {', '.join(session.names)} on {session.ref.name}; active: {session.active}")
    console.print(CHAT_HELP, highlight=False)
    history: list[dict] = []
    while True:
        try:
            line = input(f"[{session.active}]> ").strip()
        except EOFError:
            break
        if not line:
            continue
        command, *args = line.split()
        try:
            if command in {"/quit", "/exit"}:
                break
            if command == "/use" and len(args) == 1:
                session.use(args[0])
            elif command == "/base":
                session.use("base")
            elif command == "/list":
                console.print(" ".join(f"[bold]{n}[/]" if n == session.active else n for n in session.names))
            elif command == "/reset":
                history = []
            elif command == "/mix" and len(args) >= 2:
                kind = args[-1] if "=" not in args[-1] else "cat"
                pairs = [a.split("=", 1) for a in args[1:] if "=" in a]
                session.combine(args[0], {name: float(weight) for name, weight in pairs}, kind)
                console.print(f"added {args[0]}; /use {args[0]} to talk to it, /save {args[0]} DIR to keep it")
            elif command == "/save" and len(args) == 2:
                console.print(f"saved {session.save(args[0], args[1])}")
            elif command.startswith("/"):
                console.print(CHAT_HELP, highlight=False)
            else:
                history.append({"role": "user", "content": line})
                answer = session.chat(history, max_new_tokens)
                history.append({"role": "assistant", "content": answer})
                console.print(f"[bold]{session.active}:[/] {answer}", highlight=False)
        except (LorafitError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)


@app.command()
def combine(
    adapter: Annotated[
        list[str], typer.Option("--adapter", metavar="[NAME=]PATH", help="Adapter or run folder (repeatable).")
    ],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per --adapter: 0.7,0.3")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the combined PEFT adapter.")],
    combination: Annotated[str, typer.Option(help="cat (exact), svd or linear.")] = "cat",
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapters record).")] = None,
) -> None:
    """Combine adapters into one, weighted (PEFT's add_weighted_adapter), saved as a new adapter."""
    from lorafit.adapters.switch import AdapterSession, parse_named

    try:
        named = parse_named(adapter)
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights {weights}: give numbers separated by commas, e.g. 0.7,0.3.") from None
        if len(values) != len(named):
            raise UsageError(f"--weights has {len(values)} values for {len(named)} adapters; give one per --adapter.")
        session = AdapterSession(named, base)
        session.combine("combined", dict(zip(named, values)), combination)
        saved = session.save("combined", out)
    except LorafitError as exc:
        _fail(exc)
        return
    console.print(f"combined {', '.join(f'{n} x{w:g}' for n, w in zip(named, values))} ({combination}) -> {saved}")


def bare_resume_means_latest(argv: list[str]) -> list[str]:
    """`--resume` with no value (last, or followed by another option) means `--resume latest`;
    typer has no options with an optional value."""
    out = []
    for index, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            out.append("latest")
    return out


def run() -> None:
    """Console-script entry point."""
    try:
        app(args=bare_resume_means_latest(sys.argv[1:]))
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    run()

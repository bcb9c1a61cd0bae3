"""What to do with an adapter: `lorafit merge`, `export`, `chat`, `combine`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lorafit.cli.app import _fail, console
from lorafit.errors import LorafitError, UsageError
from lorafit.options import default_of


def merge(
    adapter: Annotated[str, typer.Argument(metavar="RUN_OR_ADAPTER", help="A run folder or a PEFT adapter folder.")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the merged transformers model.")],
    dtype: Annotated[str, typer.Option(help="Weights of the merged model: f32, bf16 or f16.")] = "bf16",
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the one the adapter records in lorafit.json).")
    ] = None,
    max_shard_mb: Annotated[int, typer.Option(help="Largest safetensors shard, in MB.")] = default_of(
        "options.max_shard_mb"
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Merge even if the adapter records other base weights.")
    ] = False,
) -> None:
    """Merge a LoRA adapter into its base: a plain transformers model folder (safetensors, config,
    tokenizer and chat template), streamed tensor by tensor."""
    from lorafit.api import merge as merge_adapter

    try:
        result = merge_adapter(
            adapter,
            out,
            dtype=dtype,
            base=base,
            max_shard_mb=max_shard_mb,
            overwrite=overwrite,
            allow_base_mismatch=allow_base_mismatch,
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
    overwrite: Annotated[bool, typer.Option(help="Replace a GGUF file (and Modelfile) lorafit wrote before.")] = False,
) -> None:
    """Export an adapter merged into its base (or a fully fine-tuned run) as GGUF for llama.cpp and
    Ollama, with a Modelfile beside it; checked in llama.cpp when llama-cpp-python is installed."""
    from lorafit.api import export as export_model

    try:
        result = export_model(
            adapter,
            out,
            format=format_,
            type=type_,
            base=base,
            verify=verify,
            pre_tokenizer=pre_tokenizer,
            allow_base_mismatch=allow_base_mismatch,
            adapter_only=adapter_only,
            overwrite=overwrite,
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
    "/mix NEW A=0.5 B=0.5 [cat|linear|svd]  combine adapters · /save NAME DIR [--overwrite] · /reset  new "
    "conversation · /quit"
)


def chat(
    adapter: Annotated[
        list[str], typer.Option("--adapter", metavar="[NAME=]PATH", help="Adapter or run folder (repeatable).")
    ],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapters record).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer (greedy).")] = default_of(
        "options.chat_max_new_tokens"
    ),
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32.")] = "auto",
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Load adapters even if they record other base weights.")
    ] = False,
) -> None:
    """Chat with one base model and several adapters, switching between them without reloading."""
    from lorafit.adapters.switch import AdapterSession, parse_named
    from lorafit.options import check_options

    try:
        check_options(
            {
                "--max-new-tokens": ("options.chat_max_new_tokens", max_new_tokens),
                "--precision": ("train.precision", precision),
            }
        )
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
                weights = {name: float(weight) for name, weight in pairs}
                check_options({"/mix weights": ("options.combine_weights", list(weights.values()))})
                session.combine(args[0], weights, kind)
                console.print(f"added {args[0]}; /use {args[0]} to talk to it, /save {args[0]} DIR to keep it")
            elif command == "/save" and len(args) in (2, 3) and args[2:] in ([], ["--overwrite"]):
                saved = session.save(args[0], args[1], overwrite=len(args) == 3, option="/save")
                console.print(f"saved {saved}")
            elif command.startswith("/"):
                console.print(CHAT_HELP, highlight=False)
            else:
                history.append({"role": "user", "content": line})
                answer = session.chat(history, max_new_tokens)
                history.append({"role": "assistant", "content": answer})
                console.print(f"[bold]{session.active}:[/] {answer}", highlight=False)
        except (LorafitError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)


def combine(
    adapter: Annotated[
        list[str], typer.Option("--adapter", metavar="[NAME=]PATH", help="Adapter or run folder (repeatable).")
    ],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per --adapter: 0.7,0.3")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the combined PEFT adapter.")],
    combination: Annotated[str, typer.Option(help="cat (exact), svd or linear.")] = "cat",
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapters record).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an adapter lorafit saved in --out before.")] = False,
) -> None:
    """Combine adapters into one, weighted (PEFT's add_weighted_adapter), saved as a new adapter."""
    from lorafit.adapters.switch import COMBINATIONS, AdapterSession, parse_named
    from lorafit.options import check_options
    from lorafit.outputs import check_output_folder

    try:
        named = parse_named(adapter)
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights {weights}: give numbers separated by commas, e.g. 0.7,0.3.") from None
        check_options({"--weights": ("options.combine_weights", values)})
        if len(values) != len(named):
            raise UsageError(f"--weights has {len(values)} values for {len(named)} adapters; give one per --adapter.")
        if combination not in COMBINATIONS:
            raise UsageError(f"--combination {combination}: use one of {', '.join(COMBINATIONS)}.")
        check_output_folder(out, "adapter", overwrite)  # before the model is loaded
        session = AdapterSession(named, base)
        session.combine("combined", dict(zip(named, values)), combination)
        saved = session.save("combined", out, overwrite=overwrite)
    except LorafitError as exc:
        _fail(exc)
        return
    console.print(f"combined {', '.join(f'{n} x{w:g}' for n, w in zip(named, values))} ({combination}) -> {saved}")

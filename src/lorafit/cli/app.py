"""The typer app, its global options and error handling; the commands live beside it, one module
per stage of the pipeline (data, train, evaluate, adapters)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

from lorafit import __version__
from lorafit.config_files import field_reference
from lorafit.errors import LorafitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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


def _print_version(value: bool) -> None:
    if value:
        console.print(f"lorafit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool,
        # Eager: `lorafit --version` answers before typer asks for a command.
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    global _debug
    _debug = debug or bool(os.environ.get("LORAFIT_DEBUG"))
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
    # Escaped: a message quoting a list ([q_proj]) must not be read as console markup.
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _interrupt(signum: int, frame) -> None:
    global _signal_name
    _signal_name = signal.Signals(signum).name
    raise KeyboardInterrupt  # unwinds through every `finally`, so temporary files are removed


_signal_name = "SIGINT"


def guarded(command: Callable) -> Callable:
    """Every command runs inside this: SIGTERM unwinds like Ctrl-C (temporary files removed on the
    way out), an interruption exits 130 saying what was left, and an error lorafit did not foresee
    is one line naming its type, never a traceback (`--debug` shows it)."""

    @functools.wraps(command)
    def run_command(*args, **kwargs):
        global _signal_name
        _signal_name = "SIGINT"
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            return command(*args, **kwargs)
        except LorafitError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            if _debug:
                raise
            console.print(
                f"[bold red]interrupted[/] by {_signal_name}: stopped before finishing; nothing half-written was "
                "left (lorafit writes under temporary names and renames only complete outputs). Run the command "
                "again to redo it.",
                highlight=False,
            )
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # typer's own way out, and its usage errors
        except Exception as exc:
            if _debug:
                raise
            console.print(
                f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}. lorafit did not expect this; rerun "
                "with --debug for the details, and please report it with the command line.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return run_command


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

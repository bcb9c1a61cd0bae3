"""The `lorafit` command line: each command parses its options and calls one library function.

Commands are registered here, in the order of the pipeline (`lorafit --help` lists them so)."""

from lorafit.cli.adapter_commands import chat, combine, export, merge
from lorafit.cli.app import _fields_help, app, bare_resume_means_latest, console, run
from lorafit.cli.data_commands import prepare
from lorafit.cli.eval_commands import evaluate_models
from lorafit.cli.train_commands import train

app.command()(prepare)
app.command(epilog=_fields_help())(train)
app.command(name="eval")(evaluate_models)
app.command()(merge)
app.command()(export)
app.command()(chat)
app.command()(combine)

__all__ = ["app", "bare_resume_means_latest", "console", "run"]

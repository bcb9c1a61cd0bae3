"""The `lorafit` command line: each command parses its options and calls one library function.

Commands are registered here, in the order of the pipeline (`lorafit --help` lists them so)."""

from lorafit.cli.adapter_commands import chat, combine, export, merge
from lorafit.cli.app import _fields_help, app, bare_resume_means_latest, console, guarded, run
from lorafit.cli.data_commands import prepare
from lorafit.cli.env_commands import env
from lorafit.cli.eval_commands import evaluate_models
from lorafit.cli.serve_commands import serve
from lorafit.cli.train_commands import train
from lorafit.cli.ui_commands import ui

app.command()(guarded(prepare))
app.command(epilog=_fields_help())(guarded(train))
app.command(name="eval")(guarded(evaluate_models))
app.command()(guarded(merge))
app.command()(guarded(export))
app.command()(guarded(chat))
app.command()(guarded(combine))
app.command()(guarded(serve))
app.command()(guarded(env))
app.command()(guarded(ui))

__all__ = ["app", "bare_resume_means_latest", "console", "run"]

"""`lorafit ui`: the web page over a folder of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafit.cli.app import console
from lorafit.cli.serve_commands import LOOPBACK
from lorafit.errors import UsageError


def ui(
    runs: Annotated[Path, typer.Option(help="The folder whose run folders the page shows.")] = Path("runs"),
    host: Annotated[str, typer.Option(help="Address to listen on (beyond loopback: with --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAFIT_API_KEY", help="Key the page asks for; needed beyond loopback.")
    ] = None,
) -> None:
    """A web page for the runs under --runs: status, live loss curves (several overlaid), reports, stop and resume."""
    import uvicorn

    from lorafit.ui.app import UiSettings, create_app

    if host not in LOOPBACK and not api_key:
        raise UsageError(f"--host {host} serves beyond this machine: give --api-key KEY (or LORAFIT_API_KEY) too.")
    if runs.exists() and not runs.is_dir():
        raise UsageError(f"--runs {runs}: not a folder.")
    settings = UiSettings(runs=runs, host=host, port=port, api_key=api_key)
    shown = "localhost" if host in LOOPBACK else host
    console.print(f"lorafit ui: http://{shown}:{port}/  (runs in {runs.resolve()}; Ctrl-C stops the page only)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")

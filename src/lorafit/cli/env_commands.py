"""`lorafit env`: versions, CPU features, GPUs and caches, copy-pasteable for bug reports."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lorafit.cli.app import console


def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")] = False,
) -> None:
    """What this machine gives lorafit: versions, CPU features, GPUs, caches, the precision 'auto' picks."""
    from lorafit.environment import describe_environment, environment_lines

    found = describe_environment()
    if as_json:
        print(json.dumps(found.to_json(), indent=2))
        return
    # Plain lines, no markup or wrapping: pasted into an issue as they are.
    for line in environment_lines(found):
        console.print(line, markup=False, highlight=False, soft_wrap=True)

"""lorafit: adapt Llama-family language models to a domain with LoRA.

The Python API mirrors the command line (see `lorafit.api`): `lorafit.prepare`, `lorafit.train`,
`lorafit.evaluate`, `lorafit.merge`, `lorafit.export` and `lorafit.AdapterSession`. They are
imported on first use, so `import lorafit` stays quick (no torch until a step runs).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = ("prepare", "train", "evaluate", "merge", "export", "AdapterSession", "PrepareResult")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        value = getattr(importlib.import_module("lorafit.api"), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))

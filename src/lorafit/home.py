"""Where lorafit keeps its caches: `$LORAFIT_HOME`, default `~/.cache/lorafit`."""

from __future__ import annotations

import os
from pathlib import Path


def lorafit_home() -> Path:
    """Return the cache root, created if missing."""
    root = Path(os.environ.get("LORAFIT_HOME") or Path.home() / ".cache" / "lorafit")
    root.mkdir(parents=True, exist_ok=True)
    return root

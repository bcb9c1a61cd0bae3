"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

A crash mid-write then leaves the previous file (or none), never a truncated one. Temporary names
start with `.lorafit-tmp-PID-`, so a later command can tell a killed process's leftovers from a
live one's work (`lorafit.outputs.sweep_stale`). JSON is written strictly: a non-finite number
(a diverged loss, an overflowing perplexity) becomes null, never a bare NaN that JSON readers reject.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".lorafit-tmp-"


def staging_prefix(name: str) -> str:
    """Prefix of a temporary name for `name`, owned by this process."""
    return f"{STAGING_PREFIX}{os.getpid()}-{name}-"


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under, beside `path`, before it is renamed to it."""
    return path.with_name(f"{staging_prefix(path.name)}partial")


def strict_json_value(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text (allow_nan=False after replacing non-finite numbers by null)."""
    return json.dumps(strict_json_value(value), indent=indent, ensure_ascii=False, allow_nan=False)


def _read_umask() -> int:
    # Reading the umask means setting it; done once, at import, rather than around every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


@contextmanager
def atomic_writer(path: Path) -> Iterator:
    """A binary file to write `path` through, a piece at a time: it appears under its name only
    when the block ends without an error (and is removed otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path.name), dir=path.parent)
    try:
        # mkstemp creates the file 0600; a report or summary gets the permissions any new file would.
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, to_json(data, indent=2) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    with atomic_writer(path) as handle:
        for record in records:
            handle.write((to_json(record) + "\n").encode("utf-8"))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and flush it to disk, so metrics survive a crash."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(to_json(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

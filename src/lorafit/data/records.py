"""JSON records from .jsonl (one per line) and .json (an array) files, each with where it came from.

A record that cannot be read is reported with its file and line (or index) and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lorafit.data.documents import Problems

RECORD_SUFFIXES = {".jsonl", ".json"}


def iter_records(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(where, record) for every JSON object in `path`; `where` is 'file:line' or 'file[index]'."""
    if path.suffix.lower() == ".json":
        yield from _json_array_records(path, problems)
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.add(where, "unreadable", "not valid UTF-8")
                continue
            except json.JSONDecodeError as exc:
                problems.add(where, "unreadable", f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                problems.add(where, "unreadable", "a JSON object per line is expected")
                continue
            yield where, record


def _json_array_records(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        problems.add(str(path), "unreadable", "not valid UTF-8")
        return
    except json.JSONDecodeError as exc:
        problems.add(f"{path}:{exc.lineno}", "unreadable", f"invalid JSON ({exc.msg})")
        return
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        problems.add(str(path), "unreadable", "a JSON array of objects is expected")
        return
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        if isinstance(record, dict):
            yield where, record
        else:
            problems.add(where, "unreadable", "a JSON object is expected")

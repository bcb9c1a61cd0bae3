"""JSON records from .jsonl (one per line) and .json (an array) files, each with where it came from.

A record that cannot be read is reported with its file and line (or index) and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lorafit.data.documents import Problems

RECORD_SUFFIXES = {".jsonl", ".json"}


def iter_records(
    path: Path, problems: Problems, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[str, dict]]:
    """(where, record) for every JSON object in `path`; `where` is 'file:line' or 'file[index]'.
    A JSONL file may be read in part: the lines from byte `start` (a line's start, numbered
    `first_line`) to byte `end`, so worker processes can share one large file."""
    if path.suffix.lower() == ".json":
        yield from _json_array_records(path, problems)
        return
    with path.open("rb") as handle:
        handle.seek(start)
        for number, raw in enumerate(_lines_until(handle, end), start=first_line):
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


def _lines_until(handle, end: int | None) -> Iterator[bytes]:
    position = handle.tell()
    for raw in handle:
        if end is not None and position >= end:
            return
        position += len(raw)
        yield raw


def line_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of consecutive parts of a JSONL file of about `chunk_bytes`
    each, cut at line ends (one quick pass over the bytes)."""
    ranges: list[tuple[int, int, int]] = []
    start, line, position = 0, 1, 0
    lines_in_part = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            cut = 0
            while position + len(block) - start >= chunk_bytes:
                newline = block.find(b"\n", max(cut, start + chunk_bytes - 1 - position))
                if newline < 0:
                    break
                end = position + newline + 1
                lines_in_part += block.count(b"\n", cut, newline + 1)
                ranges.append((start, end, line))
                line += lines_in_part
                lines_in_part, start, cut = 0, end, newline + 1
            lines_in_part += block.count(b"\n", cut)
            position += len(block)
    if position > start or not ranges:
        ranges.append((start, position, line))
    return ranges


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

"""Is a file lorafit reads whole? Cheap checks that turn a cut or garbled artifact (a JSON file
cut mid-way, a safetensors or GGUF file truncated by a full disk or a killed copy) into one message
naming the file and what is wrong, before a library fails on it with a traceback — or, worse,
reads it into the wrong shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lorafit.errors import UsageError


class DamagedFileError(UsageError):
    """A file that exists but cannot be what it claims to be; the message names it and the fault."""


def read_json_file(path: Path, expected: type = dict) -> Any:
    """Parse a JSON file lorafit or a library wrote; DamagedFileError if it is cut or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFileError(f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged.") from None
    except OSError as exc:
        raise DamagedFileError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = " (it ends early: cut off?)" if exc.pos >= len(text.rstrip()) else ""
        raise DamagedFileError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{cut}; the file is damaged."
        ) from None
    if not isinstance(value, expected):
        raise DamagedFileError(f"{path}: expected a JSON {expected.__name__}, found {type(value).__name__}.")
    return value


def check_safetensors(path: Path) -> dict:
    """The header of a complete safetensors file (name -> dtype, shape, offsets); DamagedFileError
    for a file that is empty, truncated or not safetensors at all."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DamagedFileError(f"{path}: {size} bytes, too short for a safetensors file; it is damaged.")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8 or length > 100 * 1024**2:
                raise DamagedFileError(f"{path}: not a safetensors file, or truncated (header of {length} bytes).")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise DamagedFileError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    except (ValueError, UnicodeDecodeError):
        raise DamagedFileError(f"{path}: not a safetensors file (its header is not JSON); it is damaged.") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: not a safetensors file (its header is not a table of tensors).")
    header.pop("__metadata__", None)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise DamagedFileError(f"{path}: not a safetensors file (tensor entries without offsets).") from None
    if 8 + length + end > size:
        raise DamagedFileError(
            f"{path}: truncated: its tensors need {8 + length + end:,} bytes but the file has {size:,}; restore or "
            "rewrite it."
        )
    return header


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """A GGUF file starts with its magic and a version; anything else is refused by name."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise DamagedFileError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if head[:4] != GGUF_MAGIC:
        raise DamagedFileError(f"{path}: not a GGUF file (it does not start with 'GGUF'); check the path.")
    if len(head) < 8:
        raise DamagedFileError(f"{path}: truncated GGUF file ({len(head)} bytes).")

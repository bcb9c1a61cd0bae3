"""Drop training documents that share a long n-gram with an evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.data.documents import Document
from lorafit.data.words import word_units
from lorafit.errors import DataError


def record_texts(record: object) -> list[str]:
    """Every string inside a JSON record (instruction, input, output, messages...)."""
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        return [text for value in record.values() for text in record_texts(value)]
    if isinstance(record, list):
        return [text for value in record for text in record_texts(value)]
    return []


def _hashed_ngrams(units: list[str], n: int) -> set[int]:
    return {hash(tuple(units[i : i + n])) for i in range(len(units) - n + 1)}


def excluded_ngrams(paths: list[str | Path], n: int) -> set[int]:
    """n-grams (hashed) of every text in the JSONL evaluation files; bad lines are errors here,
    because silently ignoring part of an evaluation set would let contamination through."""
    found: set[int] = set()
    for entry in paths:
        path = Path(entry)
        if not path.is_file():
            raise DataError(f"--exclude {path}: no such file; name the evaluation JSONL to decontaminate against.")
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc.msg}); fix or remove the line.") from None
                for text in record_texts(record):
                    found |= _hashed_ngrams(word_units(text), n)
    return found


def is_contaminated(text: str, banned: set[int], n: int) -> bool:
    if not banned:
        return False
    units = word_units(text)
    return any(hash(tuple(units[i : i + n])) in banned for i in range(len(units) - n + 1))


def drop_contaminated(documents: list[Document], banned: set[int], n: int) -> tuple[list[Document], int]:
    kept = [doc for doc in documents if not is_contaminated(doc.text, banned, n)]
    return kept, len(documents) - len(kept)

"""The per-document work of `prepare`, done in worker processes: read and extract a part of the
inputs, normalise, and compute what de-duplication, decontamination and splitting decide on
(hashes, a MinHash signature, the contamination check, the split position). The main process then
decides in input order, so any number of workers gives the same output as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.data.clean import exact_digest, normalize_text
from lorafit.data.decontaminate import is_contaminated
from lorafit.data.dedup import minhash_signature
from lorafit.data.documents import Document, Problem, Problems
from lorafit.data.readers import read_file, read_jsonl
from lorafit.data.records import line_ranges
from lorafit.data.split import position_of_digest

JSONL_PART_BYTES = 1 << 20  # a worker's share of a large JSONL file


@dataclass(frozen=True)
class WorkUnit:
    """A file, or a range of a JSONL file's lines (bytes start..end, the first numbered first_line)."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1
    size: int = 0  # bytes, for progress


def plan_units(files: list[Path], part_bytes: int | None = None) -> list[WorkUnit]:
    """Work units in input order: whole files, large JSONL files in line ranges."""
    part_bytes = part_bytes or JSONL_PART_BYTES
    units = []
    for path in files:
        size = path.stat().st_size
        if path.suffix.lower() == ".jsonl" and size > part_bytes:
            ranges = line_ranges(path, part_bytes)
            units.extend(WorkUnit(str(path), start, end, line, end - start) for start, end, line in ranges)
        else:
            units.append(WorkUnit(str(path), size=size))
    return units


@dataclass
class CleanedDocument:
    """A document after cleaning, with what the decisions need; `reason` set when it was dropped
    on its own (empty, too short), `text` then empty."""

    source: str
    text: str
    chars: int
    reason: str | None = None
    exact_key: int = 0  # first 8 bytes of the SHA-256 of the case- and space-folded text
    split_position: float = 0.0  # in [0, 1): held out for validation below valid_ratio
    signature: np.ndarray | None = None
    contaminated: bool = False


@dataclass
class UnitResult:
    documents: list[CleanedDocument]
    problems: list[Problem]
    size: int


@dataclass
class CleaningSettings:
    text_field: str
    min_chars: int
    banned_ngrams: set[int]  # hashed n-grams of the evaluation sets (empty: no decontamination)
    exclude_ngram: int


_settings: CleaningSettings | None = None


def use_settings(settings: CleaningSettings) -> None:
    """Set in each worker (inherited when forked) before any unit is cleaned."""
    global _settings
    _settings = settings


def read_unit(unit: WorkUnit, text_field: str, problems: Problems) -> list[Document]:
    path = Path(unit.path)
    if unit.end is not None:
        return list(read_jsonl(path, text_field, problems, unit.start, unit.end, unit.first_line))
    return list(read_file(path, text_field, problems))


def clean_document(document: Document, settings: CleaningSettings) -> CleanedDocument:
    text = normalize_text(document.text)
    reason = "empty" if not text else "too_short" if len(text) < settings.min_chars else None
    if reason is not None:
        return CleanedDocument(source=document.source, text="", chars=len(text), reason=reason)
    digest = exact_digest(text)
    return CleanedDocument(
        source=document.source,
        text=text,
        chars=len(text),
        exact_key=int.from_bytes(digest[:8], "big"),
        split_position=position_of_digest(digest),
        signature=minhash_signature(text),
        contaminated=is_contaminated(text, settings.banned_ngrams, settings.exclude_ngram),
    )


def clean_unit(unit: WorkUnit) -> UnitResult:
    """Every document of the unit, cleaned; unreadable files and lines as problems."""
    assert _settings is not None, "use_settings() first"
    problems = Problems()
    documents = [clean_document(doc, _settings) for doc in read_unit(unit, _settings.text_field, problems)]
    return UnitResult(documents=documents, problems=problems.items, size=unit.size)

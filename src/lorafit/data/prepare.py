"""`lorafit prepare`: raw documents -> cleaned, de-duplicated, decontaminated train/valid JSONL."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.clean import normalize_text
from lorafit.data.decontaminate import drop_contaminated, excluded_ngrams
from lorafit.data.dedup import drop_exact_duplicates, drop_near_duplicates
from lorafit.data.documents import Document, Problems
from lorafit.data.readers import read_documents
from lorafit.data.split import split_documents
from lorafit.errors import DataError
from lorafit.io import write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

REMOVAL_REASONS = ("empty", "too_short", "exact_duplicate", "near_duplicate", "contaminated", "unreadable")


@dataclass
class PrepareOptions:
    text_field: str = "text"
    min_chars: int = 200
    near_dup_threshold: float = 0.8
    valid_ratio: float = 0.1
    exclude: list[str] = field(default_factory=list)
    exclude_ngram: int = 13


@dataclass
class Prepared:
    train: list[Document]
    valid: list[Document]
    stats: dict
    problems: Problems


def clean_documents(documents: list[Document], min_chars: int, removed: dict[str, int]) -> list[Document]:
    kept = []
    for doc in documents:
        text = normalize_text(doc.text)
        if not text:
            removed["empty"] += 1
        elif len(text) < min_chars:
            removed["too_short"] += 1
        else:
            kept.append(Document(text=text, source=doc.source))
    return kept


def prepare_documents(inputs: Iterable[str | Path], options: PrepareOptions) -> Prepared:
    """Run the whole cleaning pipeline in memory; `write_prepared` puts the result on disk."""
    problems = Problems()
    raw = read_documents(inputs, options.text_field, problems)
    removed = dict.fromkeys(REMOVAL_REASONS, 0)
    removed["unreadable"] = problems.count("unreadable")
    documents = clean_documents(raw, options.min_chars, removed)
    documents, removed["exact_duplicate"] = drop_exact_duplicates(documents)
    documents, removed["near_duplicate"] = drop_near_duplicates(documents, options.near_dup_threshold)
    if options.exclude:
        banned = excluded_ngrams(options.exclude, options.exclude_ngram)
        documents, removed["contaminated"] = drop_contaminated(documents, banned, options.exclude_ngram)
    if not documents:
        raise DataError(f"No documents left after cleaning ({removed}); check the inputs or lower data.min_chars.")
    train, valid = split_documents(documents, options.valid_ratio)
    stats = {
        "documents_in": len(raw) + removed["unreadable"],
        "documents_kept": len(documents),
        "removed": removed,
        "train_documents": len(train),
        "valid_documents": len(valid),
        "train_chars": sum(len(d.text) for d in train),
        "valid_chars": sum(len(d.text) for d in valid),
    }
    return Prepared(train=train, valid=valid, stats=stats, problems=problems)


def add_token_counts(prepared: Prepared, count_tokens: Callable[[list[str]], int]) -> None:
    prepared.stats["train_tokens"] = count_tokens([d.text for d in prepared.train])
    prepared.stats["valid_tokens"] = count_tokens([d.text for d in prepared.valid])


def write_prepared(prepared: Prepared, out_dir: Path) -> dict[str, Path]:
    """Write train.jsonl, valid.jsonl and stats.json (each atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "valid": out_dir / "valid.jsonl", "stats": out_dir / "stats.json"}
    write_jsonl_atomic(paths["train"], ({"text": d.text, "source": d.source} for d in prepared.train))
    write_jsonl_atomic(paths["valid"], ({"text": d.text, "source": d.source} for d in prepared.valid))
    stats = dict(prepared.stats)
    stats["problems"] = [{"where": p.where, "reason": p.reason, "message": p.message} for p in prepared.problems.items]
    write_json_atomic(paths["stats"], stats)
    return paths


def load_prepared_jsonl(
    paths: Iterable[str | Path], text_field: str = "text", problems: Problems | None = None
) -> tuple[list[Document], Problems]:
    """Documents from already-prepared JSONL files (bad lines reported into `problems`, not fatal)."""
    problems = problems if problems is not None else Problems()
    documents = [d for d in read_documents(paths, text_field, problems) if d.text.strip()]
    return documents, problems

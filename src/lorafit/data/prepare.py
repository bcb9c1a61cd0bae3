"""`lorafit prepare`: raw documents -> cleaned, de-duplicated, decontaminated train/valid JSONL."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import DataSection
from lorafit.data.clean import normalize_text
from lorafit.data.decontaminate import drop_contaminated, excluded_ngrams
from lorafit.data.dedup import drop_exact_duplicates, drop_near_duplicates
from lorafit.data.documents import Document, Problems, first_of
from lorafit.data.readers import read_documents
from lorafit.data.split import split_documents
from lorafit.errors import DataError
from lorafit.io import write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

REMOVAL_REASONS = ("empty", "too_short", "exact_duplicate", "near_duplicate", "contaminated", "unreadable")


_DATA = DataSection()  # the defaults


@dataclass
class PrepareOptions:
    """How `prepare` cleans and splits; the defaults are data's config keys' (one source)."""

    text_field: str = _DATA.text_field
    min_chars: int = _DATA.min_chars
    near_dup_threshold: float = _DATA.near_dup_threshold
    valid_ratio: float = _DATA.valid_ratio
    exclude: list[str] = field(default_factory=list)
    exclude_ngram: int = _DATA.exclude_ngram
    # How advice names a setting: config keys by default; `lorafit prepare` maps them to its options.
    setting_names: dict[str, str] = field(default_factory=dict)

    def setting(self, key: str) -> str:
        return self.setting_names.get(key, key)


@dataclass
class Prepared:
    train: list[Document]
    valid: list[Document]
    stats: dict
    problems: Problems


def clean_documents(
    documents: list[Document], min_chars: int, removed: dict[str, int], examples: dict[str, list[str]] | None = None
) -> list[Document]:
    """Normalised documents of at least `min_chars`; `examples` collects a few sources per removal."""
    kept = []
    for doc in documents:
        text = normalize_text(doc.text)
        reason = "empty" if not text else "too_short" if len(text) < min_chars else None
        if reason is None:
            kept.append(Document(text=text, source=doc.source))
            continue
        removed[reason] += 1
        if examples is not None and len(examples.setdefault(reason, [])) < SHOWN_EXAMPLES:
            examples[reason].append(f"{doc.source} ({len(text)} characters)")
    return kept


SHOWN_EXAMPLES = 3  # sources or problems quoted per cause when everything was rejected


def nothing_left_error(
    inputs: list[str], removed: dict[str, int], examples: dict[str, list[str]], problems: Problems, options
) -> DataError:
    """Why every document was rejected: each cause with its count, its first instances, and the
    fix, naming the setting as the user's command spells it."""
    lines = [f"No documents left from {', '.join(inputs)}:"]
    if removed["unreadable"]:
        unreadable = [p for p in problems.items if p.reason == "unreadable"]
        lines.append(
            f"- {removed['unreadable']} unreadable ({first_of(unreadable, SHOWN_EXAMPLES)}); fix or convert them "
            f"(text must be UTF-8, PDFs need a text layer, JSONL records need a '{options.text_field}' field: "
            f"{options.setting('data.text_field')})."
        )
    if removed["empty"]:
        lines.append(
            f"- {removed['empty']} without any text after extraction ({', '.join(examples.get('empty', []))}): "
            "pages without main content or empty files."
        )
    if removed["too_short"]:
        lines.append(
            f"- {removed['too_short']} shorter than {options.min_chars} characters "
            f"({', '.join(examples.get('too_short', []))}); lower {options.setting('data.min_chars')}."
        )
    if removed["exact_duplicate"] or removed["near_duplicate"]:
        lines.append(
            f"- {removed['exact_duplicate']} exact and {removed['near_duplicate']} near-duplicates of others; "
            f"raise {options.setting('data.near_dup_threshold')} (now {options.near_dup_threshold}) to keep "
            "more similar documents."
        )
    if removed["contaminated"]:
        lines.append(
            f"- {removed['contaminated']} share {options.exclude_ngram}-word passages with the evaluation sets "
            f"{options.setting('data.exclude')} ({', '.join(options.exclude)}); check those are the right files."
        )
    if len(lines) == 1:
        lines.append(f"- no documents were found in them; check {options.setting('data.train')}.")
    return DataError("\n".join(lines))


def prepare_documents(inputs: Iterable[str | Path], options: PrepareOptions) -> Prepared:
    """Run the whole cleaning pipeline in memory; `write_prepared` puts the result on disk."""
    problems = Problems()
    inputs = [str(entry) for entry in inputs]
    raw = read_documents(inputs, options.text_field, problems)
    removed = dict.fromkeys(REMOVAL_REASONS, 0)
    removed["unreadable"] = problems.count("unreadable")
    examples: dict[str, list[str]] = {}
    documents = clean_documents(raw, options.min_chars, removed, examples)
    documents, removed["exact_duplicate"] = drop_exact_duplicates(documents)
    documents, removed["near_duplicate"] = drop_near_duplicates(documents, options.near_dup_threshold)
    if options.exclude:
        banned = excluded_ngrams(options.exclude, options.exclude_ngram)
        documents, removed["contaminated"] = drop_contaminated(documents, banned, options.exclude_ngram)
    if not documents:
        raise nothing_left_error(inputs, removed, examples, problems, options)
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
    stats["problems"] = prepared.problems.records()
    write_json_atomic(paths["stats"], stats)
    return paths


def load_prepared_jsonl(
    paths: Iterable[str | Path], text_field: str = "text", problems: Problems | None = None
) -> tuple[list[Document], Problems]:
    """Documents from already-prepared JSONL files (bad lines reported into `problems`, not fatal)."""
    problems = problems if problems is not None else Problems()
    documents = [d for d in read_documents(paths, text_field, problems) if d.text.strip()]
    return documents, problems

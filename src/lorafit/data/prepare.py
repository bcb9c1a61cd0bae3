"""`lorafit prepare`: raw documents -> cleaned, de-duplicated, decontaminated train/valid documents.

Documents stream through: worker processes read and clean a part of the inputs at a time
(corpus_work), and this process decides in input order — exact duplicate, near duplicate,
contaminated, train or validation — so memory holds the duplicate indexes and a few parts in
flight, never the corpus, and any number of workers decides as one does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import DataSection
from lorafit.data.corpus_work import CleanedDocument, CleaningSettings, clean_unit, plan_units, use_settings
from lorafit.data.decontaminate import excluded_ngrams
from lorafit.data.dedup import near_duplicate_index
from lorafit.data.dedup_index import ExactKeys
from lorafit.data.documents import Document, Problems, first_of
from lorafit.data.readers import find_files, read_documents
from lorafit.data.split import split_documents
from lorafit.data.work_pool import map_in_order, worker_count
from lorafit.errors import DataError

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
    workers: int = _DATA.workers  # processes that read and clean (0: one per available core)
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


@dataclass
class PrepareTally:
    """What the stream met: removals by reason (with a few sources each), problems, documents."""

    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REMOVAL_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)
    documents_in: int = 0
    kept: int = 0

    def remove(self, reason: str, document: CleanedDocument) -> None:
        self.removed[reason] += 1
        if len(self.examples.setdefault(reason, [])) < SHOWN_EXAMPLES:
            self.examples[reason].append(f"{document.source} ({document.chars} characters)")


# Called after each part of the input: (bytes read, documents read, documents kept so far).
ProgressReport = Callable[[int, int, int], None]


def kept_documents(
    inputs: list[str], options: PrepareOptions, tally: PrepareTally, report: ProgressReport | None = None
) -> Iterator[CleanedDocument]:
    """The documents that survive cleaning, de-duplication and decontamination, in input order."""
    units = plan_units(find_files(inputs))
    banned = excluded_ngrams(options.exclude, options.exclude_ngram) if options.exclude else set()
    settings = CleaningSettings(options.text_field, options.min_chars, banned, options.exclude_ngram)
    exact, near = ExactKeys(), near_duplicate_index(options.near_dup_threshold)
    try:
        for result in map_in_order(clean_unit, units, worker_count(options.workers), use_settings, (settings,)):
            tally.problems.items.extend(result.problems)
            tally.removed["unreadable"] += sum(1 for p in result.problems if p.reason == "unreadable")
            tally.documents_in += len(result.documents)
            for document in result.documents:
                reason = _removal(document, exact, near)
                if reason is not None:
                    tally.remove(reason, document)
                    continue
                tally.kept += 1
                yield document
            if report is not None:
                report(result.size, len(result.documents), tally.kept)
    finally:
        near.close()
    tally.documents_in += tally.removed["unreadable"]


def _removal(document: CleanedDocument, exact: ExactKeys, near) -> str | None:
    """Why the document goes (None: it stays). Each check records what passes it, in this order,
    as removing all exact duplicates, then near duplicates, then contaminated documents would."""
    if document.reason is not None:
        return document.reason
    if exact.add_unless_seen(document.exact_key):
        return "exact_duplicate"
    if near.add_unless_duplicate(document.signature):
        return "near_duplicate"
    if document.contaminated:
        return "contaminated"
    return None


SHOWN_EXAMPLES = 3  # sources or problems quoted per cause when everything was rejected


def nothing_left_error(inputs: list[str], tally: PrepareTally, options: PrepareOptions) -> DataError:
    """Why every document was rejected: each cause with its count, its first instances, and the
    fix, naming the setting as the user's command spells it."""
    removed, examples, problems = tally.removed, tally.examples, tally.problems
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


def prepare_stats(tally: PrepareTally, sides: dict[str, tuple[int, int]]) -> dict:
    """stats.json's counts; `sides`: (documents, characters) of train and valid."""
    return {
        "documents_in": tally.documents_in,
        "documents_kept": tally.kept,
        "removed": dict(tally.removed),
        "train_documents": sides["train"][0],
        "valid_documents": sides["valid"][0],
        "train_chars": sides["train"][1],
        "valid_chars": sides["valid"][1],
    }


def prepare_documents(inputs: Iterable[str | Path], options: PrepareOptions) -> Prepared:
    """The whole cleaning pipeline with its result in memory (for inputs that fit: evaluation
    files); `prepared_folder.prepare_to_folder` streams a corpus of any size to disk instead."""
    inputs = [str(entry) for entry in inputs]
    tally = PrepareTally()
    documents = [Document(text=d.text, source=d.source) for d in kept_documents(inputs, options, tally)]
    if not documents:
        raise nothing_left_error(inputs, tally, options)
    train, valid = split_documents(documents, options.valid_ratio)
    sides = {name: (len(docs), sum(len(d.text) for d in docs)) for name, docs in (("train", train), ("valid", valid))}
    return Prepared(train=train, valid=valid, stats=prepare_stats(tally, sides), problems=tally.problems)


def load_prepared_jsonl(
    paths: Iterable[str | Path], text_field: str = "text", problems: Problems | None = None
) -> tuple[list[Document], Problems]:
    """Documents from already-prepared JSONL files (bad lines reported into `problems`, not fatal)."""
    problems = problems if problems is not None else Problems()
    documents = [d for d in read_documents(paths, text_field, problems) if d.text.strip()]
    return documents, problems

"""The documents of a training run: prepared JSONL used as is, raw documents prepared on the fly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.config import DataSection
from lorafit.data.documents import Document, Problems
from lorafit.data.pack import pack_documents
from lorafit.data.prepare import PrepareOptions, load_prepared_jsonl, prepare_documents, write_prepared
from lorafit.data.readers import find_files
from lorafit.data.split import split_documents
from lorafit.data.tokenize import tokenize_cached
from lorafit.errors import DataError


@dataclass
class RunDocuments:
    train: list[Document]
    valid: list[Document]
    stats: dict = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)


def _options(data: DataSection, valid_ratio: float) -> PrepareOptions:
    return PrepareOptions(
        text_field=data.text_field,
        min_chars=data.min_chars,
        near_dup_threshold=data.near_dup_threshold,
        valid_ratio=valid_ratio,
        exclude=list(data.exclude),
        exclude_ngram=data.exclude_ngram,
    )


def _is_prepared(paths: list[Path]) -> bool:
    return all(path.suffix.lower() == ".jsonl" for path in paths)


def load_run_documents(data: DataSection, prepared_dir: Path) -> RunDocuments:
    """Train/valid documents for `data`; raw inputs are cleaned and written to `prepared_dir`."""
    problems = Problems()
    train_files = find_files(data.train)
    valid_ratio = 0.0 if data.valid else data.valid_ratio
    stats: dict = {}
    if _is_prepared(train_files):
        train, _ = load_prepared_jsonl(train_files, data.text_field, problems)
        valid: list[Document] = []
        if not data.valid:
            train, valid = split_documents(train, valid_ratio)
    else:
        prepared = prepare_documents(train_files, _options(data, valid_ratio))
        write_prepared(prepared, prepared_dir)
        train, valid, stats = prepared.train, prepared.valid, prepared.stats
        problems.items.extend(prepared.problems.items)
    if data.valid:
        valid_files = find_files(data.valid)
        if _is_prepared(valid_files):
            valid, _ = load_prepared_jsonl(valid_files, data.text_field, problems)
        else:
            valid = prepare_documents(valid_files, _options(data, 0.0)).train
    if not train:
        raise DataError(f"No training documents in {', '.join(data.train)}; check data.train and data.text_field.")
    if not valid:
        raise DataError(
            "No validation documents: set data.valid, or a data.valid_ratio > 0 with at least two training documents."
        )
    return RunDocuments(train=train, valid=valid, stats=stats, problems=problems)


@dataclass
class RunBlocks:
    train: list[np.ndarray]
    valid: list[np.ndarray]
    stats: dict
    train_lengths: list[int]  # tokens per training document, to trace a block back to its sources


def pack_run_documents(documents: RunDocuments, tokenizer, seq_len: int) -> RunBlocks:
    """Tokenize (cached) and pack: full blocks for training, every token kept for validation."""
    train_ids = tokenize_cached([d.text for d in documents.train], tokenizer)
    valid_ids = tokenize_cached([d.text for d in documents.valid], tokenizer)
    train = pack_documents(train_ids, tokenizer.eos_token_id, seq_len)
    valid = pack_documents(valid_ids, tokenizer.eos_token_id, seq_len, keep_tail=True)
    train_lengths = [len(ids) for ids in train_ids]
    train_tokens = sum(train_lengths)
    if not train:
        raise DataError(
            f"The training data has fewer tokens ({train_tokens}) than one block of "
            f"train.seq_len={seq_len}; add data or lower train.seq_len."
        )
    stats = {
        **documents.stats,
        "train_documents": len(documents.train),
        "valid_documents": len(documents.valid),
        "train_tokens": train_tokens,
        "valid_tokens": int(sum(len(ids) for ids in valid_ids)),
        "train_blocks": len(train),
        "valid_blocks": len(valid),
    }
    return RunBlocks(train=train, valid=valid, stats=stats, train_lengths=train_lengths)

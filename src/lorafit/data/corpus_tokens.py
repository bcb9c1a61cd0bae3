"""Tokenize a prepared JSONL file in worker processes into a cached, memory-mapped token shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lorafit.data.corpus_work import WorkUnit
from lorafit.data.documents import Problems
from lorafit.data.readers import read_jsonl
from lorafit.data.records import line_ranges
from lorafit.data.token_shards import TokenShard, open_shard, token_dtype
from lorafit.data.tokenize import cached_shard_folder, shard_writer, tokenize_texts
from lorafit.data.work_pool import map_in_order

TOKENIZE_PART_BYTES = 1 << 20

_tokenizer = None
_dtype: np.dtype | None = None  # the shard's id type, decided by the vocabulary once


def use_tokenizer(tokenizer) -> None:
    """Set in each worker (inherited when forked) before any unit is tokenized."""
    global _tokenizer, _dtype
    _tokenizer, _dtype = tokenizer, token_dtype(len(tokenizer))


def tokenize_unit(unit: WorkUnit) -> list[np.ndarray]:
    """The token ids of the unit's records' 'text', in the shard's narrow type (half the bytes to
    hand back to the main process)."""
    texts = [d.text for d in read_jsonl(Path(unit.path), "text", Problems(), unit.start, unit.end, unit.first_line)]
    return [ids.astype(_dtype) for ids in tokenize_texts(texts, _tokenizer)]


def tokenize_prepared_file(
    path: Path,
    texts_fingerprint: str,
    tokenizer,
    workers: int,
    report: Callable[[int, int], None] | None = None,
) -> TokenShard:
    """The shard of the texts of a file `prepare` wrote (fingerprinted while it wrote them): from
    the cache when an earlier run made it, else tokenized by `workers` processes and cached.
    `report(texts, tokens)` follows each part."""
    folder = cached_shard_folder(texts_fingerprint, tokenizer)
    shard = open_shard(folder)
    if shard is not None:
        if report is not None:
            report(len(shard), shard.tokens)
        return shard
    ranges = line_ranges(path, TOKENIZE_PART_BYTES)
    units = [WorkUnit(str(path), start, end, line, end - start) for start, end, line in ranges]
    writer = shard_writer(folder, tokenizer)
    try:
        for part in map_in_order(tokenize_unit, units, workers, use_tokenizer, (tokenizer,)):
            for ids in part:
                writer.append(ids)
            if report is not None:
                report(len(part), sum(len(ids) for ids in part))
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()

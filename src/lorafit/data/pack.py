"""Pack tokenized documents into fixed-length blocks, with EOS between documents."""

from __future__ import annotations

import numpy as np


def concatenate_with_eos(documents: list[np.ndarray], eos_id: int) -> np.ndarray:
    """One stream: doc0 EOS doc1 EOS ... (every document ends with EOS so the model learns to stop)."""
    if not documents:
        return np.zeros(0, dtype=np.int64)
    eos = np.asarray([eos_id], dtype=np.int64)
    return np.concatenate([part for doc in documents for part in (doc.astype(np.int64), eos)])


def pack_documents(documents: list[np.ndarray], eos_id: int, seq_len: int, keep_tail: bool = False) -> list[np.ndarray]:
    """Blocks of exactly `seq_len` tokens; the last, shorter block is kept only with `keep_tail`
    (validation keeps it so every token is scored; training drops it so batches stay uniform)."""
    stream = concatenate_with_eos(documents, eos_id)
    full = len(stream) // seq_len
    blocks = list(stream[: full * seq_len].reshape(full, seq_len)) if full else []
    tail = stream[full * seq_len :]
    if keep_tail and len(tail) > 1:
        blocks.append(tail)
    return blocks


def documents_in_blocks(document_lengths: list[int], seq_len: int, blocks: list[int]) -> list[int]:
    """Indices of the documents whose tokens (EOS included) fall in the given packed blocks."""
    ends = np.cumsum(np.asarray(document_lengths, dtype=np.int64) + 1)
    found: set[int] = set()
    for block in blocks:
        first = int(np.searchsorted(ends, block * seq_len, side="right"))
        last = int(np.searchsorted(ends, (block + 1) * seq_len - 1, side="right"))
        found.update(range(first, min(last, len(ends) - 1) + 1))
    return sorted(found)

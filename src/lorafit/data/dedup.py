"""Exact and near-duplicate removal (MinHash signatures from datasketch, in a compact LSH index)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasketch import MinHash

from lorafit.data.clean import exact_key
from lorafit.data.dedup_index import NearDuplicateIndex
from lorafit.data.documents import Item
from lorafit.data.words import ngrams, word_units

SHINGLE_UNITS = 5
NUM_PERM = 128


def drop_exact_duplicates(documents: list[Item]) -> tuple[list[Item], int]:
    return drop_exact_duplicates_by(documents, lambda doc: doc.text)


def drop_exact_duplicates_by(items: list[Item], text_of: Callable[[Item], str]) -> tuple[list[Item], int]:
    """Keep the first of items whose normalised `text_of` is equal."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = exact_key(text_of(item))
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept, len(items) - len(kept)


def minhash_of(text: str, num_perm: int = NUM_PERM) -> MinHash:
    shingles = ngrams(word_units(text), SHINGLE_UNITS)
    signature = MinHash(num_perm=num_perm, seed=1)
    signature.update_batch([s.encode("utf-8") for s in shingles])
    return signature


def minhash_signature(text: str) -> np.ndarray:
    """The text's MinHash values as uint32 (datasketch keeps them below 2**32 in uint64)."""
    return minhash_of(text).hashvalues.astype(np.uint32)


def near_duplicate_index(threshold: float) -> NearDuplicateIndex:
    return NearDuplicateIndex(threshold, NUM_PERM)


def drop_near_duplicates(documents: list[Item], threshold: float) -> tuple[list[Item], int]:
    """Keep the first of each group of documents whose estimated Jaccard similarity >= threshold."""
    index = near_duplicate_index(threshold)
    try:
        kept = [doc for doc in documents if not index.add_unless_duplicate(minhash_signature(doc.text))]
    finally:
        index.close()
    return kept, len(documents) - len(kept)

"""Exact and near-duplicate removal (MinHash LSH from datasketch)."""

from __future__ import annotations

from collections.abc import Callable

from datasketch import MinHash, MinHashLSH

from lorafit.data.clean import exact_key
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


def drop_near_duplicates(documents: list[Item], threshold: float) -> tuple[list[Item], int]:
    """Keep the first of each group of documents whose estimated Jaccard similarity >= threshold."""
    if threshold >= 1.0:  # only equal shingle sets (LSH cannot band for a threshold of 1)
        return drop_exact_duplicates_by(documents, lambda doc: minhash_of(doc.text).hashvalues.tobytes().hex())
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    signatures: dict[str, MinHash] = {}
    kept = []
    for index, doc in enumerate(documents):
        signature = minhash_of(doc.text)
        # LSH candidates are probable matches; confirm with the signatures' Jaccard estimate.
        if any(signature.jaccard(signatures[key]) >= threshold for key in lsh.query(signature)):
            continue
        key = str(index)
        lsh.insert(key, signature)
        signatures[key] = signature
        kept.append(doc)
    return kept, len(documents) - len(kept)

"""Exact and near-duplicate removal (MinHash LSH from datasketch)."""

from __future__ import annotations

from datasketch import MinHash, MinHashLSH

from lorafit.data.clean import exact_key
from lorafit.data.documents import Document
from lorafit.data.words import ngrams, word_units

SHINGLE_UNITS = 5
NUM_PERM = 128


def drop_exact_duplicates(documents: list[Document]) -> tuple[list[Document], int]:
    seen: set[str] = set()
    kept = []
    for doc in documents:
        key = exact_key(doc.text)
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept, len(documents) - len(kept)


def minhash_of(text: str, num_perm: int = NUM_PERM) -> MinHash:
    shingles = ngrams(word_units(text), SHINGLE_UNITS)
    signature = MinHash(num_perm=num_perm, seed=1)
    signature.update_batch([s.encode("utf-8") for s in shingles])
    return signature


def drop_near_duplicates(documents: list[Document], threshold: float) -> tuple[list[Document], int]:
    """Keep the first of each group of documents whose estimated Jaccard similarity >= threshold."""
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

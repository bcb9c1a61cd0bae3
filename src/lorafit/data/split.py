"""Deterministic document-level train/validation split by a hash of each document."""

from __future__ import annotations

from lorafit.data.clean import exact_key
from lorafit.data.documents import Document


def split_position(doc: Document) -> float:
    """A stable number in [0, 1) drawn from the document's text (not its order or path)."""
    return int(exact_key(doc.text)[:15], 16) / 16**15


def split_documents(documents: list[Document], valid_ratio: float) -> tuple[list[Document], list[Document]]:
    """Split whole documents; a document lands on the same side whatever else is in the set."""
    if valid_ratio <= 0 or len(documents) < 2:
        return list(documents), []
    positions = [split_position(doc) for doc in documents]
    valid = [doc for doc, pos in zip(documents, positions) if pos < valid_ratio]
    train = [doc for doc, pos in zip(documents, positions) if pos >= valid_ratio]
    if not valid:
        # Small sets can miss the ratio entirely; hold out the lowest-hash document instead.
        lowest = min(range(len(documents)), key=positions.__getitem__)
        valid = [documents[lowest]]
        train = [doc for i, doc in enumerate(documents) if i != lowest]
    return train, valid

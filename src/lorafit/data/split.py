"""Deterministic train/validation split by a hash of each document's (or example's) text."""

from __future__ import annotations

from collections.abc import Sequence

from lorafit.data.clean import exact_digest
from lorafit.data.documents import HasText, Item


def split_position(item: HasText) -> float:
    """A stable number in [0, 1) drawn from the item's text (not its order or path)."""
    return position_of_digest(exact_digest(item.text))


def position_of_digest(digest: bytes) -> float:
    """The split position of a text whose `exact_digest` is `digest` (its first 60 bits)."""
    return (int.from_bytes(digest[:8], "big") >> 4) / 16**15


def split_documents(items: Sequence[Item], valid_ratio: float) -> tuple[list[Item], list[Item]]:
    """Split whole documents (or examples); one lands on the same side whatever else is in the set."""
    if valid_ratio <= 0 or len(items) < 2:
        return list(items), []
    positions = [split_position(item) for item in items]
    valid = [item for item, pos in zip(items, positions) if pos < valid_ratio]
    train = [item for item, pos in zip(items, positions) if pos >= valid_ratio]
    if not valid:
        # Small sets can miss the ratio entirely; hold out the lowest-hash item instead.
        lowest = min(range(len(items)), key=positions.__getitem__)
        valid = [items[lowest]]
        train = [item for i, item in enumerate(items) if i != lowest]
    return train, valid

"""Pack tokens into fixed-length blocks: documents with EOS between them, or whole instruction
examples that never see each other.

Text (continued pretraining) is one stream cut every `seq_len` tokens. Instruction examples are
placed whole (best fit, longest first) and each block records where an example starts through
`position_ids` that restart at 0: transformers turns restarting positions into a block-diagonal
causal mask, so attention never crosses an example boundary and rotary positions are the ones the
example would have alone (examples that attended to each other, or whose positions ran on from
the previous one, would learn from contamination no inference ever sees). The space left at a
block's end is padding with label -100; being after every real token, causal attention never lets
a real token see it.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafit.data.token_shards import TokenShard

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross-entropy default)


class StreamMembers(Sequence):
    """Per block of one packed text stream, the documents with tokens in it, found when asked
    (a list per block would cost memory and time in proportion to blocks × documents)."""

    def __init__(self, ends: np.ndarray, seq_len: int, blocks: int) -> None:
        self.ends = ends  # where each document's EOS ends in the stream (exclusive)
        self.seq_len = seq_len
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, block):
        if isinstance(block, slice):
            return [self[i] for i in range(*block.indices(self.blocks))]
        if not 0 <= block < self.blocks:
            raise IndexError(block)
        first = int(np.searchsorted(self.ends, block * self.seq_len, side="right"))
        last = int(np.searchsorted(self.ends, (block + 1) * self.seq_len - 1, side="right"))
        return list(range(first, min(last, len(self.ends) - 1) + 1))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # mutable-sequence semantics: compared by content, never hashed


@dataclass
class PackedBlocks:
    """N blocks of L tokens. `labels` None means every token is a target (plain text);
    `position_ids` None means 0..L-1 in every block (one causal stream). `input_ids` may be a
    read-only view of a memory-mapped token shard in its narrow integer type."""

    input_ids: np.ndarray  # (N, L) integer ids
    labels: np.ndarray | None
    position_ids: np.ndarray | None
    members: Sequence[list[int]]  # per block: indices of the documents/examples with tokens in it

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def full_labels(self) -> np.ndarray:
        return self.input_ids if self.labels is None else self.labels

    def full_positions(self) -> np.ndarray:
        if self.position_ids is not None:
            return self.position_ids
        return np.broadcast_to(np.arange(self.seq_len, dtype=np.int64), self.input_ids.shape)

    def head(self, count: int) -> PackedBlocks:
        """The first `count` blocks (all of them if count is 0)."""
        if not count or count >= len(self):
            return self
        return PackedBlocks(
            self.input_ids[:count],
            None if self.labels is None else self.labels[:count],
            None if self.position_ids is None else self.position_ids[:count],
            self.members[:count],
        )

    def digest(self) -> str:
        """A hash of the blocks' ids, labels and positions as int64, read a few thousand blocks
        at a time (a memory-mapped corpus is never widened into memory at once)."""
        digest = hashlib.sha256()
        for array in (self.input_ids, self.labels, self.position_ids):
            if array is None:
                continue
            for start in range(0, len(array), DIGEST_BLOCKS):
                digest.update(np.ascontiguousarray(array[start : start + DIGEST_BLOCKS], dtype=np.int64).tobytes())
        return digest.hexdigest()


DIGEST_BLOCKS = 4096


def concatenate_blocks(first: PackedBlocks, second: PackedBlocks) -> PackedBlocks:
    """Both block sets in one (same seq_len)."""
    labels = positions = None
    if first.labels is not None or second.labels is not None:
        labels = np.concatenate([first.full_labels(), second.full_labels()])
    if first.position_ids is not None or second.position_ids is not None:
        positions = np.concatenate([first.full_positions(), second.full_positions()])
    return PackedBlocks(
        np.concatenate([first.input_ids, second.input_ids]),
        labels,
        positions,
        list(first.members) + list(second.members),
    )


def concatenate_with_eos(documents: list[np.ndarray], eos_id: int) -> np.ndarray:
    """One stream: doc0 EOS doc1 EOS ... (every document ends with EOS so the model learns to stop)."""
    if not documents:
        return np.zeros(0, dtype=np.int64)
    eos = np.asarray([eos_id], dtype=np.int64)
    return np.concatenate([part for doc in documents for part in (doc.astype(np.int64), eos)])


def pack_documents(documents: Sequence[np.ndarray], eos_id: int, seq_len: int, keep_tail: bool = False) -> PackedBlocks:
    """Blocks of exactly `seq_len` tokens of the EOS-separated stream. The shorter last block is kept
    only with `keep_tail` (validation keeps it so every token is scored), padded with untrained EOS.
    A token shard separated by EOS is that stream already: its blocks are a view of the file."""
    if isinstance(documents, TokenShard) and documents.separator == eos_id:
        stream, ends = documents.stream, documents.ends
    else:
        stream = concatenate_with_eos(list(documents), eos_id)
        ends = np.cumsum(np.asarray([len(doc) for doc in documents], dtype=np.int64) + 1)
    full = len(stream) // seq_len
    ids = stream[: full * seq_len].reshape(full, seq_len)
    labels = None
    tail = stream[full * seq_len :]
    if keep_tail and len(tail) > 1:
        padded = np.full(seq_len, eos_id, dtype=np.int64)
        padded[: len(tail)] = tail
        tail_labels = padded.copy()
        tail_labels[len(tail) :] = IGNORE_INDEX
        labels = np.concatenate([np.asarray(ids, dtype=np.int64), tail_labels[None]])
        ids = np.concatenate([np.asarray(ids, dtype=np.int64), padded[None]])
    return PackedBlocks(ids, labels, None, StreamMembers(ends, seq_len, len(ids)))


def documents_in_blocks(document_lengths: list[int], seq_len: int, blocks: list[int]) -> list[int]:
    """Indices of the documents whose tokens (EOS included) fall in the given packed text blocks."""
    ends = np.cumsum(np.asarray(document_lengths, dtype=np.int64) + 1)
    members = StreamMembers(ends, seq_len, max(blocks, default=-1) + 1)
    return sorted({doc for block in blocks for doc in members[block]})


def assign_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, longest first, each into the fullest bin it still fits (best fit
    decreasing: few, well-filled blocks). Deterministic: ties keep the input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for index in order:
        length = lengths[index]
        spot = bisect.bisect_left(free, (length, -1))
        if spot < len(free):
            space, chosen = free.pop(spot)
        else:
            space, chosen = capacity, len(bins)
            bins.append([])
        bins[chosen].append(index)
        bisect.insort(free, (space - length, chosen))
    return bins


def pack_examples(input_ids: list[np.ndarray], labels: list[np.ndarray], seq_len: int, pad_id: int) -> PackedBlocks:
    """Whole examples (each at most `seq_len` tokens) packed without cross-contamination."""
    bins = assign_best_fit([len(ids) for ids in input_ids], seq_len)
    count = len(bins)
    block_ids = np.full((count, seq_len), pad_id, dtype=np.int64)
    block_labels = np.full((count, seq_len), IGNORE_INDEX, dtype=np.int64)
    block_positions = np.zeros((count, seq_len), dtype=np.int64)
    for row, members in enumerate(bins):
        members.sort()
        start = 0
        for index in members:
            length = len(input_ids[index])
            block_ids[row, start : start + length] = input_ids[index]
            block_labels[row, start : start + length] = labels[index]
            block_positions[row, start : start + length] = np.arange(length)
            start += length
        # Padding continues the last example's positions: no real token ever attends to it.
        block_positions[row, start:] = np.arange(length, length + seq_len - start)
    return PackedBlocks(block_ids, block_labels, block_positions, bins)

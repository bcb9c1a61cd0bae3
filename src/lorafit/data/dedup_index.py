"""Duplicate indexes whose memory stays small per document, for corpora of millions of documents.

datasketch's in-memory MinHashLSH keeps, per document and band, a bytes key in a dict of sets
(kilobytes per document), and the signatures for confirming a candidate cost 1 KiB more. Here a
band is a 64-bit hash in sorted numpy arrays (12 bytes per document and band, plus a small dict of
recent inserts merged in as it grows), and signatures (uint32: datasketch's hash values are below
2**32) go to a temporary file, read back only for the rare candidate. Candidates are the documents
sharing a band with the query, as in datasketch (same bands and rows for the threshold), confirmed
by the same Jaccard estimate: the kept documents are the ones datasketch would keep.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from datasketch import MinHashLSH

MERGE_AT_LEAST = 1 << 16  # recent inserts kept in a dict before they are merged into the arrays
_MIX = np.uint64(0x9E3779B97F4A7C15)


class KeyTable:
    """A multimap from 64-bit keys to document numbers: sorted arrays and a dict of recent adds."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.uint64)
        self._values = np.zeros(0, dtype=np.uint32)
        self._recent: dict[int, list[int]] = {}
        self._recent_count = 0

    def __len__(self) -> int:
        return len(self._keys) + self._recent_count

    def get(self, key: int) -> list[int]:
        probe = np.uint64(key)
        first = int(np.searchsorted(self._keys, probe, side="left"))
        last = int(np.searchsorted(self._keys, probe, side="right"))
        found = self._values[first:last].tolist()
        return found + self._recent.get(key, []) if self._recent else found

    def __contains__(self, key: int) -> bool:
        return bool(self.get(key))

    def add(self, key: int, value: int) -> None:
        self._recent.setdefault(key, []).append(value)
        self._recent_count += 1
        # Merging costs the whole table, so it waits until the recent part is a share of it.
        if self._recent_count >= max(MERGE_AT_LEAST, len(self._keys) // 4):
            self._merge()

    def _merge(self) -> None:
        pairs = [(key, value) for key, values in self._recent.items() for value in values]
        keys = np.concatenate([self._keys, np.fromiter((k for k, _ in pairs), dtype=np.uint64, count=len(pairs))])
        values = np.concatenate([self._values, np.fromiter((v for _, v in pairs), dtype=np.uint32, count=len(pairs))])
        order = np.argsort(keys, kind="stable")
        self._keys, self._values = keys[order], values[order]
        self._recent, self._recent_count = {}, 0


class SignatureFile:
    """Fixed-size signatures by document number in an unlinked temporary file."""

    def __init__(self, width: int) -> None:
        self._file = tempfile.TemporaryFile(prefix="lorafit-minhash-")  # noqa: SIM115 (closed by close())
        self._size = width * 4
        self.count = 0

    def append(self, signature: np.ndarray) -> int:
        data = np.ascontiguousarray(signature, dtype=np.uint32).tobytes()
        os.pwrite(self._file.fileno(), data, self.count * self._size)
        self.count += 1
        return self.count - 1

    def read(self, number: int) -> np.ndarray:
        return np.frombuffer(os.pread(self._file.fileno(), self._size, number * self._size), dtype=np.uint32)

    def close(self) -> None:
        self._file.close()


def band_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) datasketch chooses for this threshold: the same candidates as its index."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class NearDuplicateIndex:
    """Documents' MinHash signatures; `add_unless_duplicate` keeps the first of each near-duplicate
    group (estimated Jaccard >= threshold with a document already kept)."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        # A threshold of 1 cannot be banded: only equal signatures are duplicates then.
        self.bands, self.rows = (1, num_perm) if threshold >= 1.0 else band_layout(threshold, num_perm)
        self._tables = [KeyTable() for _ in range(self.bands)]
        self._signatures = SignatureFile(num_perm) if threshold < 1.0 else None
        self._multipliers = np.random.default_rng(0).integers(1, 2**63, size=self.rows, dtype=np.uint64) * 2 + 1

    def band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (bands * self._multipliers).sum(axis=1, dtype=np.uint64)
            keys = (keys ^ (keys >> np.uint64(31))) * _MIX
        return keys.tolist()

    def add_unless_duplicate(self, signature: np.ndarray) -> bool:
        """True (and nothing stored) when `signature` near-duplicates a kept document."""
        keys = self.band_keys(signature)
        if self._signatures is None:
            if keys[0] in self._tables[0]:
                return True
            self._tables[0].add(keys[0], 0)
            return False
        checked: set[int] = set()
        for table, key in zip(self._tables, keys):
            for number in table.get(key):
                if number in checked:
                    continue
                checked.add(number)
                if np.count_nonzero(self._signatures.read(number) == signature) / self.num_perm >= self.threshold:
                    return True
        number = self._signatures.append(signature)
        for table, key in zip(self._tables, keys):
            table.add(key, number)
        return False

    def close(self) -> None:
        if self._signatures is not None:
            self._signatures.close()


class ExactKeys:
    """64-bit keys of texts seen (the first 8 bytes of their normalised SHA-256)."""

    def __init__(self) -> None:
        self._table = KeyTable()

    def add_unless_seen(self, key: int) -> bool:
        """True when `key` was seen before; else it is remembered."""
        if key in self._table:
            return True
        self._table.add(key, 0)
        return False

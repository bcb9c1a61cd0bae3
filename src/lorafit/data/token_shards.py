"""Token shards: the token ids of a list of texts as one flat file on disk, memory-mapped.

A shard is the stream `text0 SEP text1 SEP ...` (SEP: the tokenizer's end-of-sequence id, the
separator continued pretraining packs with) as little-endian uint16 when the vocabulary fits, else
uint32, plus the offset where each text starts. Packing text is then a view of the file (no copy of
the corpus in memory), and a text's ids are a slice of it. Shards live in a folder named by the
texts and the tokenizer (`$LORAFIT_HOME/tokens/<key>/`), written under a staging name and renamed,
so a killed writer leaves nothing a reader would take for a shard.

    tokens.bin    the stream
    offsets.npy   int64, one more than the texts: text i is tokens[offsets[i] : offsets[i+1] - 1]
    shard.json    dtype, texts, tokens (separators not counted), separator
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.io import staging_prefix
from lorafit.outputs import sweep_stale

TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "shard.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id (and the separator) of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class TextsFingerprint:
    """A hash of texts in order, built from each text's own digest, so texts hashed in separate
    worker processes fold into the same value as texts hashed in one."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    @staticmethod
    def text_digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def add(self, text: str) -> None:
        self._digest.update(self.text_digest(text))

    def add_digest(self, digest: bytes) -> None:
        self._digest.update(digest)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def shard_key(texts_fingerprint: str, tokenizer_fingerprint: str, separator: int) -> str:
    return hashlib.sha256(f"{texts_fingerprint}:{tokenizer_fingerprint}:{separator}".encode()).hexdigest()[:32]


@dataclass
class TokenShard(Sequence):
    """The texts' token ids (a read-only view each), and the stream that holds them."""

    stream: np.ndarray  # memory-mapped: text0 SEP text1 SEP ...
    offsets: np.ndarray  # int64, len(texts) + 1
    separator: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.stream[self.offsets[index] : self.offsets[index + 1] - 1]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def tokens(self) -> int:
        """Token ids in all texts (separators not counted)."""
        return int(len(self.stream) - len(self))

    @property
    def ends(self) -> np.ndarray:
        """Where each text's separator ends in the stream (exclusive): what packing cuts along."""
        return self.offsets[1:]


def open_shard(folder: Path) -> TokenShard | None:
    """The shard in `folder`, memory-mapped; None when there is none (or an unfinished one)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return None
    dtype = np.dtype(meta["dtype"])
    if meta["tokens"] + meta["texts"] == 0:
        stream = np.zeros(0, dtype=dtype)
    else:
        stream = np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r")
    if len(stream) != meta["tokens"] + meta["texts"] or len(offsets) != meta["texts"] + 1:
        return None
    return TokenShard(stream=stream, offsets=offsets, separator=int(meta["separator"]))


class ShardWriter:
    """Appends texts' ids to a shard under a staging name; `finish` renames it to `folder`."""

    def __init__(self, folder: Path, dtype: np.dtype, separator: int) -> None:
        self.folder = folder
        self.dtype = dtype
        self.separator = separator
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(folder.parent)  # shards a killed process left half-written
        self._staging = folder.with_name(f"{staging_prefix(folder.name)}shard")
        shutil.rmtree(self._staging, ignore_errors=True)  # this process's own leftover
        self._staging.mkdir()
        self._tokens = (self._staging / TOKENS_FILE).open("wb")
        self._offsets = array("q", [0])
        self._separator = np.asarray([separator], dtype=dtype)

    def append(self, ids: np.ndarray) -> None:
        self._tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._tokens.write(self._separator.tobytes())
        self._offsets.append(self._offsets[-1] + len(ids) + 1)

    def finish(self) -> TokenShard:
        self._tokens.flush()
        os.fsync(self._tokens.fileno())
        self._tokens.close()
        texts = len(self._offsets) - 1
        np.save(self._staging / OFFSETS_FILE, np.frombuffer(self._offsets, dtype=np.int64))
        meta = {"dtype": self.dtype.str, "texts": texts, "tokens": self._offsets[-1] - texts}
        (self._staging / META_FILE).write_text(json.dumps({**meta, "separator": self.separator}))
        try:
            os.replace(self._staging, self.folder)
        except OSError:  # another process finished the same shard first: theirs is the same
            shutil.rmtree(self._staging, ignore_errors=True)
        shard = open_shard(self.folder)
        if shard is None:
            raise OSError(f"{self.folder}: the token shard just written cannot be read back")
        return shard

    def abandon(self) -> None:
        self._tokens.close()
        shutil.rmtree(self._staging, ignore_errors=True)

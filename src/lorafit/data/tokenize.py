"""Batched tokenization with an on-disk cache keyed by the texts and the tokenizer."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from lorafit.home import lorafit_home
from lorafit.io import write_bytes_atomic

BATCH_DOCUMENTS = 64


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids (vocabulary, merges, normaliser, pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tokenize_texts(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids per text, without special tokens (packing adds the EOS separators)."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), BATCH_DOCUMENTS):
        batch = texts[start : start + BATCH_DOCUMENTS]
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    return out


def tokenize_cached(texts: list[str], tokenizer, cache_dir: Path | None = None) -> list[np.ndarray]:
    """`tokenize_texts`, memoised on disk by (texts, tokenizer) so reruns skip tokenization."""
    cache_dir = cache_dir or lorafit_home() / "tokens"
    key = hashlib.sha256(f"{texts_fingerprint(texts)}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()
    path = cache_dir / f"{key[:32]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            ids, offsets = cached["ids"], cached["offsets"]
        return [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    tokenized = tokenize_texts(texts, tokenizer)
    offsets = np.zeros(len(tokenized) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokenized], out=offsets[1:])
    ids = np.concatenate(tokenized) if tokenized else np.zeros(0, dtype=np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids, offsets=offsets)
    write_bytes_atomic(path, buffer.getvalue())
    return tokenized


def count_tokens(texts: list[str], tokenizer) -> int:
    return int(sum(len(ids) for ids in tokenize_cached(texts, tokenizer)))


CONTINUATION_ANCHOR = "\n"


def continuation_prefix_ids(tokenizer) -> list[int]:
    """For a SentencePiece-style tokenizer that prepends "▁" to every text it is given (Llama 2,
    Mistral, Phi-3), the ids "\n" alone becomes (the dummy "▁" and the newline byte), else [].

    Such a tokenizer adds the dummy space to each piece tokenized on its own, where the model,
    given the whole text, meets it once at the start: a piece that continues a text is tokenized
    after the newline anchor and the anchor's ids are cut off (see tokenize_continuations)."""
    ids = tokenizer(CONTINUATION_ANCHOR, add_special_tokens=False)["input_ids"]
    if len(ids) == 2 and tokenizer.convert_ids_to_tokens(ids[0]) == "\u2581":
        return ids
    return []


def tokenize_continuations(texts: list[str], follows_special: list[bool], tokenizer) -> list[np.ndarray]:
    """Token ids of texts that continue a text already tokenized: without the dummy prefix space,
    except right after a special token, where the tokenizer (and llama.cpp) start a new segment
    and prepend it there too."""
    prefix = continuation_prefix_ids(tokenizer)
    if not prefix:
        return tokenize_cached(texts, tokenizer)
    anchored = tokenize_cached(
        [text if special else CONTINUATION_ANCHOR + text for text, special in zip(texts, follows_special)], tokenizer
    )
    out = []
    for text, special, ids in zip(texts, follows_special, anchored):
        if special:
            out.append(ids)
        elif list(ids[: len(prefix)]) == prefix:
            out.append(ids[len(prefix) :])
        else:  # the anchor merged with what follows: tokenized alone instead
            out.append(tokenize_texts([text], tokenizer)[0])
    return out


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token (Llama
    and many others ship without a pad token; padding is masked out of every loss anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

"""Batched tokenization into token shards cached on disk by the texts and the tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lorafit.data.token_shards import ShardWriter, TextsFingerprint, TokenShard, open_shard, shard_key, token_dtype
from lorafit.home import lorafit_home

BATCH_DOCUMENTS = 64


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids (vocabulary, merges, normaliser, pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_separator(tokenizer) -> int:
    """The id between texts in a token shard: end-of-sequence, the separator packing uses."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def tokenize_texts(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids per text, without special tokens (packing adds the EOS separators)."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), BATCH_DOCUMENTS):
        batch = texts[start : start + BATCH_DOCUMENTS]
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    return out


def cached_shard_folder(texts_fingerprint: str, tokenizer, cache_dir: Path | None = None) -> Path:
    """Where the shard of texts with this fingerprint, tokenized by `tokenizer`, is cached."""
    cache_dir = cache_dir or lorafit_home() / "tokens"
    return cache_dir / shard_key(texts_fingerprint, tokenizer_fingerprint(tokenizer), shard_separator(tokenizer))


def shard_writer(folder: Path, tokenizer) -> ShardWriter:
    return ShardWriter(folder, token_dtype(len(tokenizer)), shard_separator(tokenizer))


def tokenize_cached(texts: list[str], tokenizer, cache_dir: Path | None = None) -> TokenShard:
    """`tokenize_texts` as a memory-mapped token shard, cached on disk by (texts, tokenizer) so
    reruns (and `lorafit prepare`'s own shards) skip tokenization."""
    fingerprint = TextsFingerprint()
    for text in texts:
        fingerprint.add(text)
    folder = cached_shard_folder(fingerprint.hexdigest(), tokenizer, cache_dir)
    shard = open_shard(folder)
    if shard is not None:
        return shard
    writer = shard_writer(folder, tokenizer)
    try:
        for start in range(0, len(texts), BATCH_DOCUMENTS):
            for ids in tokenize_texts(texts[start : start + BATCH_DOCUMENTS], tokenizer):
                writer.append(ids)
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()


def count_tokens(texts: list[str], tokenizer) -> int:
    return tokenize_cached(texts, tokenizer).tokens


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

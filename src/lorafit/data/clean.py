"""Unicode and whitespace normalisation of extracted text."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Sphinx heading anchors, zero-width and byte-order characters: noise for a language model.
_DROP = dict.fromkeys(map(ord, "\u00b6\u200b\u200c\u200d\u2060\ufeff"), None)
# Space-like characters that should be a plain space (NBSP and friends).
_SPACES = dict.fromkeys(map(ord, "\u00a0\u2007\u202f\u3000"), " ")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, anchors and control characters removed, trailing spaces stripped, blank runs limited.

    Leading indentation is kept: it carries meaning in code blocks.
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_DROP).translate(_SPACES)
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def canonical_text(text: str) -> str:
    """The text with case and whitespace differences folded away (what exact duplicates share)."""
    return " ".join(text.casefold().split())


def exact_digest(text: str) -> bytes:
    """SHA-256 that equates texts differing only in case and whitespace."""
    return hashlib.sha256(canonical_text(text).encode("utf-8")).digest()


def exact_key(text: str) -> str:
    """Hash that equates texts differing only in case and whitespace (hex)."""
    return exact_digest(text).hex()

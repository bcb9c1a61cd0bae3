"""The pieces of a SentencePiece `tokenizer.model` (text, score, type per id), read without
protobuf or sentencepiece installed: the file is a protobuf `ModelProto` whose field 1 repeats
`SentencePiece {string piece = 1; float score = 2; Type type = 3}`; everything else is skipped.

Llama 2, Mistral and Phi-3 ship one beside tokenizer.json. Its scores are what llama.cpp's
SentencePiece tokenizer merges by, so an export that has it writes them, as llama.cpp's converter
does.
"""

from __future__ import annotations

import struct
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's (and GGUF's) types


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = data[at : at + 8], at + 8
        elif wire == 2:
            size, at = _varint(data, at)
            value, at = data[at : at + size], at + size
        elif wire == 5:
            value, at = data[at : at + 4], at + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every id of the SentencePiece model at `path`."""
    pieces = []
    try:
        for number, wire, value in _fields(Path(path).read_bytes()):
            if number != 1 or wire != 2:
                continue
            piece, score, kind = "", 0.0, NORMAL
            for field, field_wire, item in _fields(value):
                if field == 1 and field_wire == 2:
                    piece = item.decode("utf-8")
                elif field == 2 and field_wire == 5:
                    score = struct.unpack("<f", item)[0]
                elif field == 3 and field_wire == 0:
                    kind = item
            pieces.append((piece, score, kind))
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable SentencePiece model ({exc})") from None
    return pieces

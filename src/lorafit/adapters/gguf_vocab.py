"""A transformers tokenizer as llama.cpp's GGUF tokenizer fields, for both kinds the families use:
byte-level BPE (`gpt2`: Llama 3, Qwen, SmolLM) and SentencePiece-style BPE with byte fallback
(`llama`: Llama 2, Mistral, Phi-3), with the special-token ids and flags llama.cpp reads.

Field for field it writes what llama.cpp's reference converter (`convert_hf_to_gguf.py`) writes
for the same folder (SentencePiece scores from tokenizer.model where the folder has one), with one
deliberate difference, for SentencePiece vocabularies given as tokenizer.json alone: the converter
then scores every token -1000, and llama.cpp's SentencePiece tokenizer, which merges the
best-scored pair first, splits words differently from transformers; lorafit scores each token by
the rank of the merge that makes it (earlier merges score higher), so llama.cpp merges in
transformers' order and the token ids agree (tests/test_families.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.adapters.sentencepiece_model import read_pieces
from lorafit.errors import UsageError

# Split expressions of byte-level pre-tokenizers -> llama.cpp's name for the same rules.
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
# transformers' pre-tokenizer of a model family, named in config.json -> llama.cpp's name.
PRE_TOKENIZERS = {"smollm": "smollm", "llama3": "llama-bpe", "llama-bpe": "llama-bpe", "gpt2": "gpt-2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    flags: dict[str, bool] = field(default_factory=dict)  # add_bos_token, add_eos_token, ...


def _load(folder: Path) -> tuple[dict, dict]:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return data, config


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_vocab(folder: Path, pre_tokenizer: str | None = None, own_specials: bool = False) -> GgufVocab:
    """The tokenizer in `folder` as GGUF tokenizer fields. `own_specials`: added tokens override
    tokenizer.model's own pieces too (llama.cpp's converter does so for Phi-3 only)."""
    data, config = _load(folder)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError(
            f"{folder}/tokenizer.json: a {model.get('type')} tokenizer; lorafit exports BPE tokenizers (byte-level, "
            "or SentencePiece-style with byte fallback) to GGUF."
        )
    if model.get("byte_fallback"):
        vocab = _sentencepiece_vocab(data, folder, own_specials)
    else:
        vocab = _byte_level_vocab(data)
        vocab.pre = pre_tokenizer_name(folder, data, pre_tokenizer)
    vocab.special_ids = _special_ids(folder, config, vocab.tokens)
    vocab.flags = _added_special_flags(data, config)
    return vocab


def _added_special_flags(data: dict, config: dict) -> dict[str, bool]:
    """add_bos_token / add_eos_token / add_sep_token as llama.cpp's converter reads them: from the
    post-processor's template (a special token before or after the text, one between a pair),
    else from tokenizer_config.json."""
    names = {role: _token_text(config.get(f"{role}_token")) for role in ("bos", "eos", "sep", "cls")}
    flags: dict[str, bool] = {}
    processor = data.get("post_processor") or {}
    for step in processor.get("processors", [processor]):
        if step.get("type") != "TemplateProcessing":
            continue
        single, pair = step.get("single") or [], step.get("pair") or []
        first = single[0].get("SpecialToken", {}).get("id") if single else None
        last = single[-1].get("SpecialToken", {}).get("id") if single else None
        if first:
            flags["add_bos_token"] = first in (names["bos"], names["cls"])
        if last:
            flags["add_eos_token"] = last == names["eos"]
        start = 1 if first and pair and pair[0].get("SpecialToken", {}).get("id") == first else 0
        stop = -1 if last and pair and pair[-1].get("SpecialToken", {}).get("id") == last else None
        middle = pair[start:stop][1:-1]
        if middle:
            separators = (names["sep"], names["eos"])
            entries = [item.get("SpecialToken", {}).get("id") for item in middle[:2]]
            flags["add_sep_token"] = bool(
                (entries[0] in separators and not last) or (len(entries) == 2 and entries[1] in separators)
            )
    for flag in ("add_bos_token", "add_eos_token", "add_sep_token"):
        if flag not in flags and isinstance(config.get(flag), bool):
            flags[flag] = config[flag]
    return flags


def _id_table(data: dict) -> tuple[dict[int, str], dict[int, dict]]:
    by_id = {index: text for text, index in data["model"]["vocab"].items()}
    added = {item["id"]: item for item in data.get("added_tokens", [])}
    by_id.update({index: item["content"] for index, item in added.items()})
    return by_id, added


def _byte_level_vocab(data: dict) -> GgufVocab:
    import gguf

    by_id, added = _id_table(data)
    tokens, types = [], []
    for index in range(max(by_id) + 1):
        text = by_id.get(index)
        if text is None:  # a hole in the id range: llama.cpp wants every id, unused ones marked
            tokens.append(f"[PAD{index}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text.encode("utf-8"))
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return GgufVocab("gpt2", "", tokens, types, merges=merges)


def _sentencepiece_vocab(data: dict, folder: Path, own_specials: bool = False) -> GgufVocab:
    """Pieces, scores and types: from tokenizer.model where the folder has one (the scores
    llama.cpp merges by, as its converter writes them), else scored by merge rank; the added
    tokens over them (-1000, CONTROL when special)."""
    import gguf

    by_id, added = _id_table(data)
    size = max(by_id) + 1
    model_file = folder / "tokenizer.model"
    if model_file.is_file():
        try:
            pieces = read_pieces(model_file)
        except ValueError as exc:
            raise UsageError(f"{exc}; remove or replace {model_file.name}.") from None
        tokens = [f"[PAD{index}]".encode() for index in range(size)]
        scores, types = [-10000.0] * size, [int(gguf.TokenType.UNUSED)] * size
        for index, (piece, score, kind) in enumerate(pieces[:size]):
            tokens[index], scores[index], types[index] = piece.encode("utf-8"), score, kind
    else:
        rank = {}  # token -> the rank of the merge that makes it
        for number, merge in enumerate(data["model"].get("merges", [])):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, number)
        tokens, types, scores = [], [], []
        for index in range(size):
            text = by_id.get(index, f"[PAD{index}]")
            tokens.append(text.encode("utf-8"))
            scores.append(-float(rank[text]) if text in rank else 0.0)
            if index not in by_id:
                types.append(gguf.TokenType.UNUSED)
            elif BYTE_TOKEN.fullmatch(text):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
    for index, item in added.items():
        if model_file.is_file() and index < len(pieces) and not own_specials:
            continue  # tokenizer.model's own piece (<unk>, <s>, </s>) keeps its type and score
        tokens[index] = item["content"].encode("utf-8")
        scores[index] = -1000.0
        types[index] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    return GgufVocab("llama", "default", tokens, types, scores=scores)


def _special_ids(folder: Path, config: dict, tokens: list[bytes]) -> dict[str, int]:
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(config.get(f"{role}_token"))
        if text is not None and text.encode("utf-8") in tokens:
            ids[role] = tokens.index(text.encode("utf-8"))
    if "eos" not in ids:
        raise UsageError(f"{folder}: the tokenizer names no EOS token that is in its vocabulary; cannot export.")
    return ids


def pre_tokenizer_name(folder: Path, data: dict | None = None, given: str | None = None) -> str:
    """llama.cpp's pre-tokenizer name: given; recorded by a GGUF-born base; recognised from the
    tokenizer's own split rules; or known from the family named in config.json."""
    if given:
        return given
    source = folder / "lorafit_source.txt"  # a base lorafit converted from GGUF: ask the original
    if source.is_file():
        from gguf import GGUFReader

        original = Path(source.read_text().splitlines()[0])
        if original.is_file():
            field_ = GGUFReader(str(original)).fields.get("tokenizer.ggml.pre")
            if field_ is not None:
                return field_.contents()
    data = data if data is not None else _load(folder)[0]
    recognised = _pre_tokenizer_from_rules(data)
    if recognised:
        return recognised
    config = json.loads((folder / "config.json").read_text())
    keys = ("_name_or_path", "_model_name_or_path", "name_or_path")
    name = " ".join(str(config.get(key) or "") for key in keys).lower()
    for key, value in PRE_TOKENIZERS.items():
        if key in name:
            return value
    raise UsageError(
        f"{folder}: cannot tell which llama.cpp pre-tokenizer this model's tokenizer matches; pass --pre-tokenizer "
        "(e.g. llama-bpe for Llama 3, qwen2 for Qwen, smollm for SmolLM) so llama.cpp splits text as the model was "
        "trained."
    )


def _pre_tokenizer_from_rules(data: dict) -> str | None:
    steps = data.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", [steps]) if steps.get("type") == "Sequence" else [steps]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_SPLIT and data["model"].get("ignore_merges"):
            return "llama-bpe"
        if pattern == QWEN2_SPLIT:
            return "qwen2"
    return None


def add_vocab(writer, vocab: GgufVocab, template: str | None) -> None:
    """The tokenizer fields, in the converter's order and with its presence rules."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for role, add in adders.items():
        if role in vocab.special_ids:
            add(vocab.special_ids[role])
    flag_adders = {
        "add_bos_token": writer.add_add_bos_token,
        "add_eos_token": writer.add_add_eos_token,
        "add_sep_token": writer.add_add_sep_token,
    }
    for flag, value in vocab.flags.items():
        flag_adders[flag](value)
    if template:
        writer.add_chat_template(template)

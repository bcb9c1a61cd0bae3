"""A GGUF file's tokenizer rebuilt for transformers so that it splits text as llama.cpp does.

transformers rebuilds a tokenizer from a GGUF file's vocabulary, but not always with the rules
llama.cpp applies to the same vocabulary (measured against llama.cpp's own test vectors,
`models/ggml-vocab-*.gguf.inp/.out`, in tests/test_families.py):

- SentencePiece vocabularies (`tokenizer.ggml.model` "llama": Llama 2, Mistral v0.1, Phi-3) of
  the llama architecture get a Metaspace pre-tokenizer that does not prepend "▁" to text already
  starting with a space, so " Hello" loses a token. llama.cpp (and Llama 2's own tokenizer.json)
  prepend "▁" always and then replace every space: restored as that normalizer.
- Llama 3's BPE (`tokenizer.ggml.pre` "llama-bpe") takes a whole word from the vocabulary before
  applying merges (`ignore_merges`); without it a few words split differently ("Cửa Việt").
- SmolLM's splits digits one by one before byte-level BPE ("smollm").
- A token transformers invents beyond the GGUF's vocabulary (`<|endoftext|>` as the unknown token
  of a GPT-2-style vocabulary that has none) would make the tokenizer longer than the model's
  embeddings: dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.io import write_text_atomic

# Bumped when the repairs change: a folder converted under an older number is repaired again.
TOKENIZER_RULES = 2
SPACE = "\u2581"  # SentencePiece's visible space
DIGITS_THEN_BYTES = {  # SmolLM's pre-tokenizer: each digit alone, then GPT-2's byte-level split
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def gguf_tokenizer_fields(gguf_path: Path) -> dict:
    """The tokenizer facts of a GGUF file that decide how text is split."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key: str, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    tokens = fields.get("tokenizer.ggml.tokens")
    return {
        "model": value("tokenizer.ggml.model", ""),
        "pre": value("tokenizer.ggml.pre", "default"),
        "add_space_prefix": value("tokenizer.ggml.add_space_prefix", True),
        "vocab_size": len(tokens.data) if tokens is not None else None,
    }


def repair_tokenizer_json(data: dict, facts: dict) -> list[str]:
    """Edit a tokenizer.json (as a dict) in place to split like llama.cpp; returns what changed."""
    changes = []
    model = data.get("model", {})
    if (
        facts["model"] == "llama"
        and facts["add_space_prefix"]
        and (data.get("pre_tokenizer") or {}).get("type") == "Metaspace"
    ):
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        }
        data["pre_tokenizer"] = None
        changes.append("SentencePiece: '▁' prepended always, spaces replaced (as llama.cpp)")
    if facts["pre"] == "llama-bpe" and model.get("type") == "BPE" and not model.get("ignore_merges"):
        model["ignore_merges"] = True
        changes.append("llama-bpe: whole vocabulary words before merges (ignore_merges)")
    if facts["pre"] == "smollm" and data.get("pre_tokenizer") != DIGITS_THEN_BYTES:
        data["pre_tokenizer"] = DIGITS_THEN_BYTES
        changes.append("smollm: digits split one by one")
    size = facts["vocab_size"]
    if size is not None:
        extra = [token["content"] for token in data.get("added_tokens", []) if token["id"] >= size]
        if extra:
            data["added_tokens"] = [token for token in data["added_tokens"] if token["id"] < size]
            changes.append(f"dropped {extra} (beyond the GGUF's {size} tokens)")
    return changes


def repair_saved_tokenizer(folder: Path, gguf_path: Path) -> list[str]:
    """Repair the tokenizer transformers saved into `folder` from `gguf_path` (files rewritten)."""
    facts = gguf_tokenizer_fields(gguf_path)
    tokenizer_file = folder / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    changes = repair_tokenizer_json(data, facts)
    if changes:
        write_text_atomic(tokenizer_file, json.dumps(data, ensure_ascii=False, indent=2))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    kept = {token["content"] for token in data.get("added_tokens", [])} | set(data["model"].get("vocab", {}))
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(role)
        text = token.get("content") if isinstance(token, dict) else token
        if text is not None and text not in kept:  # a dropped invented token: the role has none
            config[role] = None
            changes.append(f"{role} {text!r} removed (not in the GGUF's vocabulary)")
    if any(change.endswith("vocabulary)") for change in changes):
        write_text_atomic(config_file, json.dumps(config, ensure_ascii=False, indent=2))
    return changes


def save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> list[str]:
    """Write the tokenizer of `gguf_path` into `out_dir`, split as llama.cpp splits; returns the repairs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    return repair_saved_tokenizer(Path(out_dir), gguf_path)


def load_gguf_tokenizer(gguf_path: Path, work_dir: Path):
    """The repaired tokenizer of `gguf_path`, saved in `work_dir` and loaded from there."""
    from transformers import AutoTokenizer

    save_gguf_tokenizer(gguf_path, work_dir)
    return AutoTokenizer.from_pretrained(work_dir)

"""Tiny random models of every Llama-family base users bring, each with its family's real tokenizer.

The tokenizers and chat templates are llama.cpp's own files, from the llama-cpp-python 0.3.36
source distribution that scripts/test.sh fetches once into the cache
(`$XDG_CACHE_HOME/lorafit/sources/`): vocab-only GGUFs (`models/ggml-vocab-*.gguf`) with
llama.cpp's tokenizer test vectors beside them, the chat templates of the instruct models
(`models/templates/`), and the reference converter `convert_hf_to_gguf.py`. Nothing of theirs is
copied into this repository; tests that need them skip where the source is absent (CI requires it).

Each model has its family's architectural features at toy size: SentencePiece vs byte-level BPE,
tied vs untied head, grouped-query attention, Llama 3's `llama3` rope scaling, Qwen2's q/k/v
biases, Qwen3's q/k norms, Mistral's sliding window (narrower than the test blocks, so it acts),
Phi-3's fused qkv and gate_up projections.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

LLAMA_CPP_SOURCE = "llama_cpp_python-0.3.36"

# Chat templates users' bases ship that llama.cpp's collection lacks, as their tokenizer_config.json
# has them (Llama-2-7b-chat-hf; Mistral-7B-Instruct-v0.1).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    vocab: str  # ggml-vocab-NAME.gguf
    model_type: str
    template: str  # a file in models/templates/, or a Jinja string
    eos: str
    pad: str | None
    bos: str | None
    end_of_turn: str  # the token that ends an assistant answer in the template
    config: dict = field(default_factory=dict)
    pre_tokenizer: str = ""  # llama.cpp's name, for byte-level BPE vocabularies
    spm: bool = False
    add_bos: bool = False  # the family's tokenizer starts text with BOS where the vocab GGUF does not say so

    @property
    def gguf_arch(self) -> str:
        return {"mistral": "llama"}.get(self.model_type, self.model_type)


SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

FAMILIES = {
    family.name: family
    for family in (
        Family(
            "llama2",
            "llama-spm",
            "llama",
            LLAMA2_TEMPLATE,
            "</s>",
            None,
            "<s>",
            "</s>",
            {
                **SMALL,
                "num_key_value_heads": 4,
                "tie_word_embeddings": False,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
            spm=True,
        ),
        Family(  # the base tokenizer (EOS <|end_of_text|>) with the Instruct template: turns end in <|eot_id|>
            "llama3.1",
            "llama-bpe",
            "llama",
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            "<|end_of_text|>",
            None,
            "<|begin_of_text|>",
            "<|eot_id|>",
            {
                **SMALL,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                "max_position_embeddings": 131072,
                "rope_theta": 500000.0,
                "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192},
                "rms_norm_eps": 1e-5,
            },
            pre_tokenizer="llama-bpe",
            add_bos=True,
        ),
        Family(  # the Instruct tokenizer: EOS is <|eot_id|> itself; tied head as at 1B/3B
            "llama3.2",
            "llama-bpe",
            "llama",
            "meta-llama-Llama-3.2-3B-Instruct.jinja",
            "<|eot_id|>",
            None,
            "<|begin_of_text|>",
            "<|eot_id|>",
            {
                **SMALL,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
                "max_position_embeddings": 131072,
                "rope_theta": 500000.0,
                "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
                "rms_norm_eps": 1e-5,
            },
            pre_tokenizer="llama-bpe",
            add_bos=True,
        ),
        Family(
            "qwen2.5",
            "qwen2",
            "qwen2",
            "Qwen-Qwen2.5-7B-Instruct.jinja",
            "<|im_end|>",
            "<|endoftext|>",
            None,
            "<|im_end|>",
            {
                **SMALL,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
            },
            pre_tokenizer="qwen2",
        ),
        Family(
            "qwen3",
            "qwen2",
            "qwen3",
            "Qwen-Qwen3-0.6B.jinja",
            "<|im_end|>",
            "<|endoftext|>",
            None,
            "<|im_end|>",
            {
                **SMALL,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "tie_word_embeddings": True,
                "max_position_embeddings": 40960,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
            },
            pre_tokenizer="qwen2",
        ),
        Family(  # Mistral v0.1's tokenizer is a 32k SentencePiece like Llama 2's; llama.cpp ships Llama 2's
            "mistral",
            "llama-spm",
            "mistral",
            MISTRAL_TEMPLATE,
            "</s>",
            None,
            "<s>",
            "</s>",
            {
                **SMALL,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                "max_position_embeddings": 32768,
                "sliding_window": 48,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
            },
            spm=True,
        ),
        Family(
            "phi3",
            "phi-3",
            "phi3",
            "microsoft-Phi-3.5-mini-instruct.jinja",
            "<|endoftext|>",
            "<|endoftext|>",
            "<s>",
            "<|end|>",
            {
                **SMALL,
                "num_key_value_heads": 4,
                "tie_word_embeddings": False,
                "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
            spm=True,
        ),
    )
}


def llama_cpp_source() -> Path | None:
    """llama.cpp's tree inside the cached source distribution, if scripts/test.sh fetched it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tree = cache / "lorafit" / "sources" / LLAMA_CPP_SOURCE / "vendor" / "llama.cpp"
    return tree if (tree / "models").is_dir() else None


def vocab_file(name: str) -> Path:
    return llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf"


def _shared_cache() -> Path:
    """Built once per machine: rebuilding a 150k-token vocabulary from GGUF takes ~15 s."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lorafit" / "test-families"


def repaired_tokenizer_folder(vocab: str) -> Path:
    """The vocab GGUF's tokenizer as lorafit rebuilds it (model/gguf_tokenizer.py), cached."""
    from lorafit.model.gguf_tokenizer import TOKENIZER_RULES, save_gguf_tokenizer

    source = vocab_file(vocab)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = _shared_cache() / f"vocab-{vocab}-{digest}-rules{TOKENIZER_RULES}"
    if not (target / "tokenizer.json").is_file():
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        save_gguf_tokenizer(source, staging)
        staging.replace(target)
    return target


def vocab_pieces(vocab: str) -> list[tuple[str, float, int]]:
    """The SentencePiece pieces of a vocab GGUF (its base vocabulary: the tokens before the added ones)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(vocab_file(vocab))).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    size = len(tokens)
    for index in range(3, len(tokens)):  # the first "<|...|>" token: added by the family, not SentencePiece's
        if tokens[index].startswith("<|"):
            size = index
            break
    pieces = list(zip(tokens[:size], scores[:size], types[:size]))
    # SentencePiece's own special pieces: unknown, then BOS and EOS as control
    return [(pieces[0][0], 0.0, 2), (pieces[1][0], 0.0, 3), (pieces[2][0], 0.0, 3), *pieces[3:]]


def family_template(family: Family) -> str:
    if "{%" in family.template or "{{" in family.template:
        return family.template
    return (llama_cpp_source() / "models" / "templates" / family.template).read_text(encoding="utf-8")


def build_family_model(family: Family, folder: Path, seed: int = 0) -> Path:
    """A transformers folder: a random `family` model at toy size with the family's real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repaired_tokenizer_folder(family.vocab))
    tokenizer.eos_token = family.eos
    tokenizer.bos_token = family.bos
    tokenizer.pad_token = family.pad
    tokenizer.chat_template = family_template(family)
    if family.add_bos:
        tokenizer.add_bos_token = True
    ids = {
        role: tokenizer.convert_tokens_to_ids(text) for role, text in (("eos", family.eos), ("bos", family.bos)) if text
    }
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tokenizer),
        eos_token_id=ids["eos"],
        bos_token_id=ids.get("bos"),
        pad_token_id=tokenizer.convert_tokens_to_ids(family.pad) if family.pad else None,
        **family.config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases, so an exporter that drops or misplaces them shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if family.spm:  # as these families ship it: tokenizer.model beside tokenizer.json
        write_sentencepiece_model(Path(folder) / "tokenizer.model", vocab_pieces(family.vocab))
    (Path(folder) / "family.json").write_text(json.dumps({"family": family.name}))
    return Path(folder)


def write_sentencepiece_model(
    path: Path, pieces: list[tuple[str, float, int]], unk_id: int = 0, bos_id: int = 1, eos_id: int = 2
):
    """A minimal SentencePiece BPE model (byte fallback, dummy prefix) with these pieces, loadable
    by sentencepiece itself: the tokenizer.model Llama 2, Mistral and Phi-3 ship beside
    tokenizer.json, rebuilt from the vocab GGUF's pieces, scores and types (which llama.cpp took
    from the original tokenizer.model)."""

    def varint(value: int) -> bytes:
        value &= (1 << 64) - 1  # negative ids (-1: none) as protobuf writes them
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def key(number: int, wire: int) -> bytes:
        return varint(number << 3 | wire)

    def message(number: int, body: bytes) -> bytes:
        return key(number, 2) + varint(len(body)) + body

    out = bytearray()
    for piece, score, kind in pieces:
        text = piece.encode("utf-8")
        body = message(1, text) + key(2, 5) + struct.pack("<f", score) + key(3, 0) + varint(kind)
        out += message(1, body)
    trainer = key(3, 0) + varint(2) + key(4, 0) + varint(len(pieces)) + key(35, 0) + varint(1)
    trainer += key(40, 0) + varint(unk_id) + key(41, 0) + varint(bos_id) + key(42, 0) + varint(eos_id)
    trainer += key(43, 0) + varint(-1)
    out += message(2, trainer)
    normalizer = message(1, b"identity") + key(3, 0) + varint(1) + key(4, 0) + varint(0) + key(5, 0) + varint(1)
    out += message(3, normalizer)
    Path(path).write_bytes(bytes(out))

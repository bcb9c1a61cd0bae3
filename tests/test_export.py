"""`lorafit export --format gguf`: the file llama.cpp reads carries the right tensors, tokenizer and
template, and — where llama-cpp-python is installed (CI installs it) — computes what transformers
computes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_merge import train_adapter

from lorafit.adapters.export import export_gguf, llama_cpp_available
from lorafit.adapters.gguf_export import LORA_ALPHA, interleave_rotary_rows
from lorafit.adapters.modelfile import ollama_template
from lorafit.data.chat_template import DEFAULT_CHAT_TEMPLATE
from lorafit.model.embedded import embedded_gguf_path
from lorafit.model.rope import rope_settings

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")


def read_gguf(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return train_adapter(tmp_path_factory.mktemp("export"), tiny_model_dir, [])


def test_gguf_holds_the_merged_llama_with_its_tokenizer(tiny_run, tiny_model_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    result = export_gguf(str(tiny_run), out, "f32", verify=False, pre_tokenizer="gpt-2")
    reader = read_gguf(out)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "llama.rope.freq_base") == pytest.approx(rope_settings(config)["rope_theta"])
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[5] == next(
        t for t, i in vocab["model"]["vocab"].items() if i == 5
    )
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[config["eos_token_id"]] == 3  # CONTROL: parsed as special, never printed
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied, as in the base
    assert {f"blk.{i}.attn_q.weight" for i in range(config["num_hidden_layers"])} <= names
    # The adapted q projection is in the file, merged and in llama.cpp's interleaved rotary order.
    from safetensors import safe_open

    from lorafit.adapters.merge import merge_into_folder, read_adapter

    merged = tmp_path / "merged"
    merged.mkdir()
    merge_into_folder(tiny_model_dir, read_adapter(tiny_run / "adapter"), merged, "f32")
    with safe_open(str(merged / "model.safetensors"), "pt") as handle:
        q = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    expected = interleave_rotary_rows(q, config["num_attention_heads"]).numpy()
    np.testing.assert_allclose(np.asarray(stored.data).reshape(expected.shape), expected, rtol=0, atol=0)
    assert result.modelfile.read_text().startswith(f"FROM ./{out.name}")


def test_interleaving_turns_rotate_half_into_rotated_pairs():
    # transformers rotates (x_i, x_{i+d/2}); llama.cpp rotates (x_{2i}, x_{2i+1}): reordering the
    # projection's rows must make the two rotations produce the same values in the new order.
    heads, dim, columns = 2, 8, 5
    weight = torch.randn(heads * dim, columns)
    interleaved = interleave_rotary_rows(weight, heads)
    for head in range(heads):
        block, moved = weight[head * dim : (head + 1) * dim], interleaved[head * dim : (head + 1) * dim]
        for i in range(dim // 2):
            torch.testing.assert_close(moved[2 * i], block[i])
            torch.testing.assert_close(moved[2 * i + 1], block[i + dim // 2])


def test_modelfile_templates_for_the_formats_lorafit_trains():
    chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    template, stops = ollama_template(chatml, "<|im_end|>")
    assert "<|im_start|>{{ .Role }}" in template and "<|im_end|>" in stops
    template, stops = ollama_template(DEFAULT_CHAT_TEMPLATE, "</s>")
    assert "### Assistant:" in template and "{{ .Content }}</s>" in template and "</s>" in stops
    assert ollama_template("{{ messages }}", "</s>") is None


def test_export_refuses_what_llama_cpp_could_not_read(tiny_run, tiny_model_dir, tmp_path):
    from lorafit.errors import UsageError

    with pytest.raises(UsageError, match="--type q3"):
        export_gguf(str(tiny_run), tmp_path / "x.gguf", "q3", verify=False)
    with pytest.raises(UsageError, match="pre-tokenizer"):  # unknown tokenizer family: asked, not guessed
        export_gguf(str(tiny_run), tmp_path / "x.gguf", "f16", verify=False)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for number, (change, refusal) in enumerate(
        [
            ({"model_type": "gemma"}, "covers llama, mistral, qwen2, qwen3, phi3"),
            ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'dynamic'"),
            ({"attention_bias": True}, "biases in attention"),
        ]
    ):
        other = tmp_path / f"other-{number}"
        shutil.copytree(tiny_model_dir, other)
        (other / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UsageError, match=refusal):
            export_gguf(
                str(tiny_run), tmp_path / "x.gguf", "f16", base=str(other), verify=False, allow_base_mismatch=True
            )
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_only_gguf_holds_scaled_lora_pairs(tiny_run, tmp_path):
    from lorafit.adapters.merge import read_adapter

    out = tmp_path / "adapter.gguf"
    result = export_gguf(str(tiny_run), out, adapter_only=True, verify=False)
    reader = read_gguf(out)
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == LORA_ALPHA  # each module's scale is folded into its B
    tensors = {t.name: t for t in reader.tensors}
    adapter = read_adapter(tiny_run / "adapter")
    module = "model.layers.0.self_attn.v_proj"
    b = np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data)
    rank = adapter.lora[module]["A"].shape[0]
    expected = (adapter.lora[module]["B"] * adapter.scale(module) * rank / LORA_ALPHA).numpy()
    np.testing.assert_allclose(b.reshape(expected.shape), expected, rtol=1e-6)
    assert len(tensors) == 2 * len(adapter.lora)
    assert "ADAPTER ./adapter.gguf" in result.modelfile.read_text()


@needs_llama_cpp
def test_tiny_export_computes_the_same_in_llama_cpp(tiny_run, tmp_path):
    result = export_gguf(str(tiny_run), tmp_path / "tiny.gguf", "f32", pre_tokenizer="gpt-2")
    check = result.verification
    assert check["token_ids_equal"] and check["top1_agreement"] == 1.0
    assert check["max_logit_diff"] <= 0.1 and check["passed"]


@needs_llama_cpp
def test_fully_fine_tuned_run_exports_too(tmp_path, tiny_model_dir):
    run = train_adapter(tmp_path, tiny_model_dir, ["train.method=full", "train.lr=1e-3"])
    result = export_gguf(str(run), tmp_path / "full.gguf", "f32", pre_tokenizer="gpt-2")
    assert result.verification["passed"], result.verification


@needs_llama_cpp
def test_adapter_only_gguf_over_the_base_computes_the_merged_model(tiny_run, tmp_path):
    result = export_gguf(str(tiny_run), tmp_path / "adapter.gguf", adapter_only=True, pre_tokenizer="gpt-2")
    check = result.verification
    assert check["top1_agreement"] == 1.0 and check["max_logit_diff"] <= 0.1 and check["passed"], check


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_real_adapter_export_round_trips_through_llama_cpp(tmp_path, gguf_type):
    """The embedded SmolLM2 with a non-trivial LoRA: same token ids on digit-rich text, the same
    top-1 tokens and logits (f16) or perplexity within 1% (q8_0), the same greedy chat answer."""
    adapter = random_adapter_on_embedded_model(tmp_path / "adapter")
    result = export_gguf(str(adapter), tmp_path / f"model-{gguf_type}.gguf", gguf_type)
    check = result.verification
    assert check["token_ids_equal"] and check["chat_answer_equal"], check
    assert check["passed"], check
    original = read_gguf(embedded_gguf_path())
    exported = read_gguf(result.file)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert field(exported, key) == field(original, key), key
    assert field(exported, "tokenizer.chat_template") == field(original, "tokenizer.chat_template")


def random_adapter_on_embedded_model(folder: Path) -> Path:
    """A LoRA with random (non-zero) B on the embedded model, saved as lorafit saves adapters."""
    from peft import LoraConfig, get_peft_model

    from lorafit.adapters.save import save_adapter
    from lorafit.model.load import load_causal_lm, load_tokenizer, resolve_base, weights_fingerprint

    ref = resolve_base("")
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_causal_lm(ref), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.02)  # a visible but sane change
    template = load_tokenizer(ref).chat_template
    metadata = {
        "base_model": {"spec": "", "name": ref.name, "path": ref.path, "weights_fingerprint": weights_fingerprint(ref)},
        "chat_template": {"origin": "model", "text": template},
    }
    return save_adapter(model, folder, metadata)


@pytest.mark.slow
@needs_llama_cpp
def test_embedded_tokenizer_ids_equal_llama_cpp_on_the_pydocs_pages():
    """lorafit's cached SmolLM2 tokenizer (individual digits restored) and llama.cpp reading the
    original GGUF give the same ids on every page of the shipped pydocs sample."""
    from llama_cpp import Llama

    from lorafit.data.prepare import PrepareOptions, prepare_documents
    from lorafit.model.load import load_tokenizer, resolve_base

    pages = Path(__file__).resolve().parents[1] / "examples" / "pydocs-sample"
    prepared = prepare_documents([pages], PrepareOptions(valid_ratio=0.0))
    texts = [document.text for document in prepared.train]
    assert len(texts) > 30
    tokenizer = load_tokenizer(resolve_base(""))
    vocab = Llama(model_path=str(embedded_gguf_path()), vocab_only=True, verbose=False)
    mismatched = [
        text[:60]
        for text in texts
        if vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    assert not mismatched

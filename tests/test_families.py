"""Every Llama-family base users bring (tests/families.py: Llama 2, Llama 3.1, Llama 3.2, Qwen2.5,
Qwen3, Mistral, Phi-3), at toy size with its real tokenizer and chat template, through the whole
path: tokenizer against llama.cpp's test vectors, answer-only labels against the family's
template, prepare → train → eval → merge → export (f16, q8_0, adapter-only) checked in llama.cpp →
chat; and each exported file against the one llama.cpp's own converter writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from families import FAMILIES, build_family_model, family_template, llama_cpp_source, repaired_tokenizer_folder

import lorafit

pytestmark = pytest.mark.skipif(
    llama_cpp_source() is None, reason="llama.cpp's source distribution is not cached (scripts/test.sh fetches it)"
)
VOCABS = sorted({family.vocab for family in FAMILIES.values()})


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family_model(family, root / name) for name, family in FAMILIES.items()}


def _vectors(vocab: str) -> list[tuple[str, list[int]]]:
    models = llama_cpp_source() / "models"
    texts = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


@pytest.mark.parametrize("vocab", VOCABS)
def test_the_rebuilt_tokenizer_reproduces_llama_cpps_test_vectors(vocab):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repaired_tokenizer_folder(vocab))
    cases = _vectors(vocab)
    assert len(cases) > 40
    wrong = [
        (text, want, got)
        for text, want in cases
        if (got := tokenizer(text, add_special_tokens=False)["input_ids"]) != want
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]}"


def test_what_the_repairs_fix_is_what_transformers_gets_wrong():
    """Without the repairs, transformers' own GGUF rebuild differs from llama.cpp on these."""
    from transformers import AutoTokenizer

    models = llama_cpp_source() / "models"
    raw_spm = AutoTokenizer.from_pretrained(models, gguf_file="ggml-vocab-llama-spm.gguf")
    assert raw_spm(" Hello world", add_special_tokens=False)["input_ids"] != [29871, 15043, 3186]
    raw_bpe = AutoTokenizer.from_pretrained(models, gguf_file="ggml-vocab-llama-bpe.gguf")
    assert raw_bpe("Cửa Việt", add_special_tokens=False)["input_ids"] != [34, 91163, 101798]
    assert len(raw_bpe) == 128257  # an invented token beyond the 128,256 the model has embeddings for
    repaired = AutoTokenizer.from_pretrained(repaired_tokenizer_folder("llama-bpe"))
    assert len(repaired) == 128256


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_answer_only_labels_follow_the_familys_template(name, family_models):
    """Labels cover exactly the answer and the token that ends the turn under this family's
    template (Llama 3's <|eot_id|> even where EOS is <|end_of_text|>; Phi-3's <|end|>)."""
    from transformers import AutoTokenizer

    from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids
    from lorafit.data.examples import build_examples
    from lorafit.data.formats import Conversation
    from lorafit.data.pack import IGNORE_INDEX
    from lorafit.errors import DataError

    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(family_models[name])
    template = ChatTemplate(family_template(family), "model")
    end = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert end_of_turn_ids(tokenizer, template)[0] == end
    messages = [
        {"role": "user", "content": "What does len() return?"},
        {"role": "assistant", "content": "The number of items."},
        {"role": "user", "content": "And bool([])?"},
        {"role": "assistant", "content": "False."},
    ]
    conversation = Conversation(messages=messages, source="t:1")
    turns, answers = "all", ["The number of items.", "False."]
    if name == "qwen3":  # its template drops history's think blocks: not incremental, so only the last turn
        with pytest.raises(DataError, match="data.train_turns: last"):
            build_examples([conversation], tokenizer, template, 512)
        turns, answers = "last", ["False."]
    examples = build_examples([conversation], tokenizer, template, 512, train_turns=turns)
    ids, labels = examples.input_ids[0], examples.labels[0]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False)
    # The pieces tokenized one by one give the ids of the whole conversation tokenized at once (as
    # the model meets it at inference; SentencePiece pieces get no extra dummy space).
    assert list(ids) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = ids[labels != IGNORE_INDEX]
    assert list(trained).count(end) == len(answers) and trained[-1] == end
    text = tokenizer.decode([t for t in trained if t != end])
    assert all(answer in text for answer in answers)
    assert "len()" not in text and "bool" not in text  # no prompt token is trained
    answer_ids = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert len(trained) <= answer_ids + 2 * len(answers) + 8  # answers, their ends, Qwen3's empty think block


def _family_config(work: Path, base: Path) -> Path:
    docs = work / "docs"
    docs.mkdir(parents=True)
    for i in range(6):
        notes = " ".join(f"Python note {i}.{j}: lists hold items; dict.get(key) returns {i * j}." for j in range(10))
        (docs / f"notes{i}.txt").write_text(notes)
    with (docs / "qa.jsonl").open("w") as handle:
        for i in range(12):
            record = {"instruction": f"What does dict.get do? ({i})", "output": f"It returns the value of key {i}."}
            handle.write(json.dumps(record) + "\n")
    config = {
        "model": {"base": str(base)},
        "data": {"train": [str(docs)], "valid_ratio": 0.25, "min_chars": 50},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {
            "seq_len": 64,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "lr": 5e-3,
            "max_steps": 4,
            "eval_every": 2,
            "save_every": 0,
            "precision": "fp32",
        },
        "eval": {"prompts": ["Python lists"], "max_new_tokens": 4, "general": []},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _check_in_llama_cpp(result, gguf_type: str) -> None:
    check = result.verification
    assert check is not None, result.notes
    assert check["token_ids_equal"]
    if gguf_type == "q8_0":  # random toy weights: near-tied top-1s may flip, the perplexity may not
        assert abs(check["ppl_diff_percent"]) < 1.0 and check["top1_agreement"] > 0.9
    else:
        assert check["max_logit_diff"] < 0.01 and check["top1_agreement"] > 0.98, check


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_whole_path_for_each_family(name, family_models, tmp_path):
    pytest.importorskip("llama_cpp")
    family = FAMILIES[name]
    config = _family_config(tmp_path, family_models[name])
    run = lorafit.train(str(config), out=tmp_path / "run")
    summary = run.summary
    assert summary["steps"] == 4 and summary["valid_ppl_after"] < summary["valid_ppl_before"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    fused = {"qkv_proj", "gate_up_proj"} if name == "phi3" else {"q_proj", "k_proj", "v_proj", "gate_proj"}
    adapted = {module.rsplit(".", 1)[-1] for module in adapter["target_modules"]}
    assert fused <= adapted  # all-linear reached the family's own projections
    assert json.loads((tmp_path / "run" / "adapter" / "lorafit.json").read_text())["tokenizer"]["vocab_size"] == len(
        __import__("transformers").AutoTokenizer.from_pretrained(family_models[name])
    )  # no token added: a missing pad token reuses EOS, the embeddings keep their size

    report = lorafit.evaluate([tmp_path / "run"], out=tmp_path / "report", no_general=True, max_new_tokens=4)
    assert report.report["models"][1]["domain_ppl"] == pytest.approx(summary["valid_ppl_after"], rel=1e-3)

    merged = lorafit.merge(run.adapter, out=tmp_path / "merged", dtype="f32")
    weights = json.loads((merged.out_dir / "config.json").read_text())
    assert weights["tie_word_embeddings"] == family.config["tie_word_embeddings"]

    for gguf_type in ("f16", "q8_0"):
        exported = lorafit.export(run.adapter, out=tmp_path / f"{name}-{gguf_type}.gguf", type=gguf_type)
        _check_in_llama_cpp(exported, gguf_type)
    assert exported.summary["architecture"] == family.gguf_arch
    lora = lorafit.export(run.adapter, out=tmp_path / f"{name}-lora.gguf", adapter_only=True)
    _check_in_llama_cpp(lora, "f32")

    session = lorafit.AdapterSession({"tuned": tmp_path / "run"})
    answer = session.chat([{"role": "user", "content": "What does dict.get do?"}], max_new_tokens=6)
    assert isinstance(answer, str) and family.end_of_turn not in answer


def test_llama3_chat_generation_stops_at_eot(family_models):
    """Llama 3.1's base tokenizer ends text with <|end_of_text|>; a chat answer ends at <|eot_id|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.compute.generate import greedy_generate
    from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids

    folder = family_models["llama3.1"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token == "<|end_of_text|>"

    def say_eot(module, inputs, logits):  # the model answers "<|eot_id|>" at once, whatever it is asked
        logits[..., eot] += 1000.0
        return logits

    model.lm_head.register_forward_hook(say_eot)
    stops = end_of_turn_ids(tokenizer, ChatTemplate(tokenizer.chat_template, "model"))
    assert stops == [eot, tokenizer.eos_token_id]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    assert first == eot
    assert greedy_generate(model, tokenizer, [prompt], 8, torch.device("cpu"), stop_ids=stops) == [""]
    with torch.no_grad():  # stopping at EOS alone, the answer would run on through every <|eot_id|>
        ran_on = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert ran_on[0, ids.shape[1] :].tolist() == [eot] * 8


def test_qwen_pads_with_its_own_pad_token_not_eos(family_models):
    from lorafit.data.tokenize import pad_token_id
    from lorafit.model.load import BaseModelRef, load_tokenizer

    folder = family_models["qwen2.5"]
    tokenizer = load_tokenizer(BaseModelRef(spec=str(folder), name="qwen", path=str(folder)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert pad_token_id(tokenizer) != tokenizer.eos_token_id
    llama = family_models["llama2"]
    tokenizer = load_tokenizer(BaseModelRef(spec=str(llama), name="llama2", path=str(llama)))
    assert tokenizer.pad_token == tokenizer.eos_token and len(tokenizer) == 32000  # no new token, no resize


# Differences between lorafit's export and llama.cpp's converter, each explained and accepted.
ACCEPTED = {
    # The converter names the model from the folder ("Merged") and its size; lorafit from the run.
    "general.name": "names the run",
    "general.size_label": "not written by lorafit",
    "general.quantization_version": "not written by lorafit (f16 holds no quantized tensor)",
    "lorafit.version": "lorafit's stamp, so --overwrite replaces only its own files",
}


def _fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, item in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = item.contents()
        fields[key] = value
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def _converter_file(merged: Path, out_file: Path) -> Path:
    source = llama_cpp_source()
    done = subprocess.run(
        [
            sys.executable,
            str(source / "convert_hf_to_gguf.py"),
            str(merged),
            "--outtype",
            "f16",
            "--outfile",
            str(out_file),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out_file


def compare_with_converter(ours: Path, reference: Path) -> list[str]:
    """Every difference of metadata keys, values, tensor names, types, shapes and values."""
    our_fields, our_tensors = _fields(ours)
    their_fields, their_tensors = _fields(reference)
    problems = []
    for key in sorted(set(our_fields) | set(their_fields)):
        if key in ACCEPTED:
            continue
        if key not in our_fields or key not in their_fields:
            problems.append(f"{key}: only in {'lorafit' if key in our_fields else 'the converter'}'s file")
        elif our_fields[key] != their_fields[key] and not (
            isinstance(our_fields[key], float) and our_fields[key] == pytest.approx(their_fields[key])
        ):
            problems.append(f"{key}: {str(our_fields[key])[:80]} vs {str(their_fields[key])[:80]}")
    for name in sorted(set(our_tensors) | set(their_tensors)):
        if name not in our_tensors or name not in their_tensors:
            problems.append(f"tensor {name}: only in {'lorafit' if name in our_tensors else 'the converter'}'s file")
            continue
        (our_type, our_shape, our_data), (their_type, their_shape, their_data) = our_tensors[name], their_tensors[name]
        if (our_type, our_shape) != (their_type, their_shape):
            problems.append(f"tensor {name}: {our_type} {our_shape} vs {their_type} {their_shape}")
        elif not np.array_equal(our_data, their_data):
            problems.append(f"tensor {name}: values differ (max {np.abs(our_data - their_data).max()})")
    return problems


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_export_equals_llama_cpps_own_converter(name, family_models, tmp_path):
    """The base model exported by lorafit and by convert_hf_to_gguf.py (from the same source
    distribution as the vocabularies): same tensors (names, types, shapes, f16 values exactly) and
    the same tokenizer and model metadata, key by key, but for the differences ACCEPTED names."""
    pytest.importorskip("sentencepiece")  # the converter imports it for every SentencePiece model
    from lorafit.adapters.gguf_export import write_gguf

    folder = family_models[name]
    ours = tmp_path / "lorafit.gguf"
    write_gguf(folder, ours, "f16", name="x")
    reference = _converter_file(folder, tmp_path / "converter.gguf")
    assert compare_with_converter(ours, reference) == []


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3"])
def test_a_tokenizer_json_only_sentencepiece_export_splits_like_llama_cpp(vocab, tmp_path):
    """Without tokenizer.model, lorafit scores pieces by merge rank (llama.cpp's converter writes
    -1000 for all): llama.cpp reading the exported vocabulary reproduces its own test vectors."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lorafit.adapters.gguf_export import write_gguf

    family = next(f for f in FAMILIES.values() if f.vocab == vocab)
    folder = build_family_model(family, tmp_path / "model")
    (folder / "tokenizer.model").unlink()
    write_gguf(folder, tmp_path / "model.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    cases = _vectors(vocab)
    wrong = [text for text, want in cases if llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) != want]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]!r}"


def test_a_cached_conversion_from_an_older_lorafit_gets_its_tokenizer_repaired(tmp_path, monkeypatch):
    """A GGUF base converted before the repairs (no `tokenizer-rules` line) keeps its weights and
    has its tokenizer files repaired in place on next use."""
    from transformers import AutoTokenizer

    from lorafit.model.embedded import cached_gguf_folder, file_sha256
    from lorafit.model.gguf_tokenizer import TOKENIZER_RULES

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    source = tmp_path / "llama3.gguf"
    source.write_bytes(vocab_file_bytes("llama-bpe"))
    old = tmp_path / "home" / "models" / f"llama3-{file_sha256(source)[:16]}"
    old.mkdir(parents=True)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(old)  # unrepaired
    (old / "config.json").write_text("{}")
    (old / "lorafit_source.txt").write_text(f"{source}\nsha256 x\n")
    assert cached_gguf_folder(source, "llama3") == old
    assert f"tokenizer-rules {TOKENIZER_RULES}" in (old / "lorafit_source.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(old)
    assert len(tokenizer) == 128256
    assert tokenizer("Cửa Việt", add_special_tokens=False)["input_ids"] == [34, 91163, 101798]
    assert (old / "config.json").read_text() == "{}"  # nothing but the tokenizer touched


def vocab_file_bytes(vocab: str) -> bytes:
    return (llama_cpp_source() / "models" / f"ggml-vocab-{vocab}.gguf").read_bytes()

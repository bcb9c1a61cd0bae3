"""`lorafit merge`: the merged model computes what base + adapter computes, for every LoRA variant."""

import json

import pytest
import torch
from conftest import write_jsonl
from test_cli import invoke, make_corpus, write_config

from lorafit.adapters.merge import merge_adapter, merged_weight

VARIANTS = {
    "lora": [],
    "rslora": ["lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "pissa": ["lora.init=pissa_niter_4"],
    "patterns": ["lora.rank_pattern={v_proj: 8}", "lora.alpha_pattern={q_proj: 2}", "lora.modules_to_save=[lm_head]"],
}


def train_adapter(tmp_path, model_dir, overrides):
    config = write_config(tmp_path, model_dir, make_corpus(tmp_path / "docs"))
    args = [
        "train",
        str(config),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "train.lr=2e-2",
        "--set",
        "eval.report=false",
    ]
    args += ["--set", "eval.general=[]", "--set", "lora.target_modules=[q_proj, v_proj, down_proj]"]
    for item in overrides:
        args += ["--set", item]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_model_matches_base_plus_adapter(tmp_path, tiny_model_dir, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_adapter(tmp_path, tiny_model_dir, VARIANTS[variant])
    out = tmp_path / "merged"
    result = invoke("merge", str(run), "--out", str(out), "--dtype", "f32")
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = logits_of(base, ids)
    expected = logits_of(PeftModel.from_pretrained(base, str(run / "adapter")), ids)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (expected - before).abs().max() > 1e-3  # the adapter learned something to merge
    torch.testing.assert_close(logits_of(merged, ids), expected, atol=2e-4, rtol=1e-4)
    # The folder stands alone: the tokenizer and the provenance travel with it.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("Python lists")["input_ids"]
    record = json.loads((out / "lorafit.json").read_text())
    assert record["merged_from"]["dtype"] == "f32" and record["base_model"]["path"] == str(tiny_model_dir)


def test_bf16_merge_is_sharded_and_close(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_adapter(tmp_path, tiny_model_dir, [])
    out = tmp_path / "merged"
    merge_adapter(str(run / "adapter"), out, max_shard_bytes=16_000)  # the tiny model is ~60 kB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = logits_of(PeftModel.from_pretrained(base, str(run / "adapter")), ids)
    assert (logits_of(merged.float(), ids) - expected).abs().max() < 0.05  # bf16 rounding of the weights only


def test_dora_merge_formula_rescales_rows():
    weight, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    magnitude = torch.rand(6) + 0.5
    merged = merged_weight(weight, {"A": a, "B": b, "magnitude": magnitude}, scale=0.5)
    torch.testing.assert_close(merged.norm(dim=1), magnitude)
    direction = weight + 0.5 * b @ a
    torch.testing.assert_close(
        merged / merged.norm(dim=1, keepdim=True), direction / direction.norm(dim=1, keepdim=True)
    )


def test_merge_refuses_what_it_cannot_do(tmp_path, tiny_model_dir):
    run = train_adapter(tmp_path, tiny_model_dir, [])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    busy = invoke("merge", str(run), "--out", str(tmp_path / "busy"))
    assert busy.exit_code == 2 and "--overwrite" in busy.output
    bad_dtype = invoke("merge", str(run), "--out", str(tmp_path / "m"), "--dtype", "q4")
    assert bad_dtype.exit_code == 2 and "f32, bf16, f16" in bad_dtype.output
    config_file = run / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_bias": True}))
    refused = invoke("merge", str(run), "--out", str(tmp_path / "m"))
    assert refused.exit_code == 2 and "lora_bias" in refused.output
    assert not (tmp_path / "m").exists()


def test_merged_tokenizer_carries_the_training_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from lorafit.data.chat_template import DEFAULT_CHAT_TEMPLATE

    records = [{"instruction": f"What is item {i}?", "output": f"Item {i} is a number."} for i in range(24)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", records)
    run = train_adapter(tmp_path, tiny_model_dir, [f"data.train=[{data}]", "eval.prompts=[]", "train.seq_len=128"])
    out = tmp_path / "merged"
    assert invoke("merge", str(run), "--out", str(out)).exit_code == 0
    # The tiny model has no template of its own: the run trained with lorafit's default, so the
    # merged model must prompt with it too (a lost template is a classic broken export).
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE

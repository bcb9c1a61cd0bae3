"""LoRA variants through PEFT, full fine-tuning, LoRA+, and the checks that refuse what cannot work."""

import contextlib
import json

import pytest
import torch
import yaml
from conftest import write_jsonl
from test_cli import invoke, make_corpus, train_with_overrides, write_config

from lorafit.config import LoraSection
from lorafit.config_files import build_config
from lorafit.errors import ConfigError
from lorafit.model.lora import apply_lora, module_type, optimizer_groups, parameter_report


def tiny(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)


def valid_loss_of_saved(run_dir, tiny_model_dir, folder="adapter") -> float:
    """Validation loss recomputed from the saved artifact alone (untouched base + PEFT adapter, or
    the saved full model), on the run's validation file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.compute.objective import CausalLMObjective
    from lorafit.compute.perplexity import evaluate_loss
    from lorafit.data.pack import pack_documents
    from lorafit.data.tokenize import tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if folder == "adapter":
        model = PeftModel.from_pretrained(tiny(tiny_model_dir), run_dir / "adapter")
    else:
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in (run_dir.parent / "valid.jsonl").read_text().splitlines()]
    blocks = pack_documents(tokenize_texts(texts, tokenizer), tokenizer.eos_token_id, 32, keep_tail=True)
    objective = CausalLMObjective(model, torch.float32, 16)
    return evaluate_loss(objective, blocks, 4, torch.device("cpu"), contextlib.nullcontext).loss


def run_variant(tmp_path, tiny_model_dir, lora: dict, train: dict | None = None):
    data = make_corpus(tmp_path / "docs")
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": "Python lists and tuples are sequences. " * 6}] * 2)
    config = write_config(tmp_path, tiny_model_dir, data, max_steps=4, save_every=0, **(train or {}))
    raw = yaml.safe_load(config.read_text())
    raw["data"]["valid"] = [str(valid)]
    raw["lora"].update(lora)
    config.write_text(yaml.safe_dump(raw))
    result = invoke("train", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize(
    "lora",
    [
        {"use_rslora": False},
        {"use_dora": True},
        {"init": "gaussian"},
        {"init": "pissa"},
        {"init": "pissa_niter_4"},
        {"init": "olora"},
        {"init": "eva"},
        {"plus_ratio": 16.0},
        {"target_modules": r".*\.(q|v)_proj", "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"v_proj": 16}},
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items())[:40],
)
def test_each_variant_trains_and_its_saved_adapter_reproduces_the_model(tmp_path, tiny_model_dir, lora):
    summary = run_variant(tmp_path, tiny_model_dir, lora)
    assert summary["valid_loss_after"] < summary["valid_loss_before"]
    saved = valid_loss_of_saved(tmp_path / "run", tiny_model_dir)
    # The adapter on the untouched base gives the trained model's loss: PiSSA/OLoRA are converted
    # back to plain LoRA at save time, since their in-memory base keeps only the residual.
    assert saved == pytest.approx(summary["valid_loss_after"], rel=1e-4)
    assert summary["saved_bytes"] > 0


def test_full_fine_tuning_trains_every_weight_and_saves_a_model(tmp_path, tiny_model_dir):
    summary = run_variant(tmp_path, tiny_model_dir, {}, {"method": "full", "lr": 1e-3})
    report = summary["trainable_parameters"]
    assert summary["method"] == "full" and report["trainable"] == report["total"]
    assert {"embed_tokens", "q_proj", "down_proj", "norm"} <= set(report["by_module"])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
    saved = valid_loss_of_saved(tmp_path / "run", tiny_model_dir, folder="model")
    assert saved == pytest.approx(summary["valid_loss_after"], rel=1e-4)


def test_rank_pattern_and_modules_to_save_reach_peft_and_the_report(tiny_model_dir):
    lora = LoraSection(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}, modules_to_save=["lm_head"], bias="all"
    )
    model = apply_lora(tiny(tiny_model_dir), lora)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if "lora_A" in name}
    assert any("q_proj" in n and s[0] == 4 for n, s in shapes.items())
    assert any("v_proj" in n and s[0] == 8 for n, s in shapes.items())
    report = parameter_report(model)
    assert "lm_head" in report.by_module and "q_proj" in report.by_module
    assert module_type("base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector.default.weight") == (
        "q_proj"
    )
    assert module_type("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head"


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate(tiny_model_dir):
    model = apply_lora(tiny(tiny_model_dir), LoraSection(r=4, target_modules=["q_proj"]))
    groups = optimizer_groups(model, plus_ratio=16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[1]["lr_multiplier"] == 16.0 and all("lora_B" in names[id(p)] for p in groups[1]["params"])
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"])
    assert len(optimizer_groups(model)) == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.quantization=4bit"], "model.quantization: 4bit needs a CUDA GPU"),
        (["lora.init=loftq"], "lora.init: loftq initialises LoRA against a 4-bit base"),
        (["train.method=full", "model.quantization=8bit"], "train.method: full"),
        (["lora.init=svd"], "unknown init 'svd'"),
        (["lora.target_modules=.*attn.nothing"], "matches no linear layer"),
        (["lora.rank_pattern={q_prj: 8}"], "lora.rank_pattern: 'q_prj' matches no module"),
        (["lora.modules_to_save=[lm_heads]"], "lora.modules_to_save"),
    ],
)
def test_impossible_set_ups_are_refused_before_any_work(tmp_path, tiny_model_dir, overrides, expected):
    result = train_with_overrides(tmp_path, tiny_model_dir, overrides)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


def test_quantization_is_refused_before_the_data_is_touched(tmp_path, tiny_model_dir):
    result = train_with_overrides(tmp_path, tiny_model_dir, ["model.quantization=8bit"])
    assert result.exit_code == 2
    assert not (tmp_path / "run" / "data").exists()


def test_forgetting_is_measured_on_general_text(tmp_path, tiny_model_dir):
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data, max_steps=3)
    raw = yaml.safe_load(config.read_text())
    raw["eval"]["general"] = [str(general)]
    config.write_text(yaml.safe_dump(raw))
    result = invoke("train", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["general_ppl_before"] > 1 and summary["general_ppl_after"] > 1
    expected = 100 * (summary["general_ppl_after"] / summary["general_ppl_before"] - 1)
    assert summary["general_ppl_change_percent"] == pytest.approx(expected)


def test_config_rules_across_sections_name_their_fields():
    with pytest.raises(ConfigError, match="lora.plus_ratio"):
        build_config({"data": {"train": ["x"]}, "train": {"method": "full"}, "lora": {"plus_ratio": 4}}, "r.yaml")
    with pytest.raises(ConfigError, match="use_dora"):
        build_config({"data": {"train": ["x"]}, "lora": {"use_dora": True, "init": "eva"}}, "r.yaml")

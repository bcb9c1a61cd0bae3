"""Long sequences: train.seq_len past a base's trained context is refused unless model.rope_scaling
extends it, and a scaling (the run's, or the base's own) travels with the adapter through loading,
merging and GGUF export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cli import invoke, make_corpus, write_config

from lorafit.errors import ConfigError
from lorafit.model.rope import check_context, rope_settings, with_rope_scaling


def _copy_with_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def short_context_model(tmp_path, tiny_model_dir):
    """The tiny Llama, told it was trained on 32 positions (rotary embeddings have no weights)."""
    return _copy_with_config(tiny_model_dir, tmp_path / "short-context", max_position_embeddings=32)


def _train(tmp_path, model_dir, *settings: str, seq_len: int = 64):
    config = write_config(tmp_path, model_dir, make_corpus(tmp_path / "docs"), seq_len=seq_len, max_steps=4)
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--set", "train.lr=2e-2"]
    args += ["--set", "eval.report=false", "--set", "eval.general=[]", "--set", "eval.prompts=[]"]
    args += ["--set", "lora.target_modules=[q_proj, v_proj, down_proj]"]
    for setting in settings:
        args += ["--set", setting]
    return invoke(*args), tmp_path / "run"


def test_a_seq_len_past_the_trained_context_is_refused_with_the_factor_named(tmp_path, short_context_model):
    refused, _ = _train(tmp_path, short_context_model)
    assert refused.exit_code == 2
    assert "train.seq_len=64 exceeds the base's trained context of 32 tokens" in refused.output
    assert "model.rope_scaling: {type: yarn, factor: 2}" in refused.output
    too_small, _ = _train(tmp_path, short_context_model, "model.rope_scaling={type: linear, factor: 1.5}")
    assert too_small.exit_code == 2 and "raise the factor to at least 2" in too_small.output
    bad_type, _ = _train(tmp_path, short_context_model, "model.rope_scaling={type: longrope, factor: 2}")
    assert bad_type.exit_code == 2 and "model.rope_scaling" in bad_type.output and "longrope" in bad_type.output
    assert "Traceback" not in refused.output + too_small.output + bad_type.output


def test_rope_scaling_travels_with_the_adapter_through_loading_merge_and_export(tmp_path, short_context_model):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lorafit.adapters.export import export_gguf
    from lorafit.adapters.load import attach_adapter, locate_trained, resolve_trained_base
    from lorafit.model.load import load_causal_lm

    result, run = _train(tmp_path, short_context_model, "model.rope_scaling={type: linear, factor: 2}")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "adapter" / "lorafit.json").read_text())
    assert record["config"]["model"]["rope_scaling"] == {"type": "linear", "factor": 2.0}

    # Loaded again (as eval, chat and serve load it), the base gets the run's scaling back.
    trained = locate_trained(str(run))
    ref, _ = resolve_trained_base([trained], None)
    assert ref.rope_scaling == {"type": "linear", "factor": 2.0}
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = attach_adapter(load_causal_lm(ref), trained.path, "run")(input_ids=ids).logits
        unscaled = AutoModelForCausalLM.from_pretrained(short_context_model, dtype=torch.float32)
        assert (attach_adapter(unscaled, trained.path, "run")(input_ids=ids).logits - expected).abs().max() > 1e-3

    merged_dir = tmp_path / "merged"
    assert invoke("merge", str(run), "--out", str(merged_dir), "--dtype", "f32").exit_code == 0
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert rope_settings(merged_config)["rope_type"] == "linear" and rope_settings(merged_config)["factor"] == 2.0
    assert merged_config["max_position_embeddings"] == 64
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=2e-4, rtol=1e-4)

    from lorafit.serve.vllm import vllm_command  # vLLM's server gets the same scaling and context

    command = vllm_command({"run": str(run)}, None, "127.0.0.1", 8000, None)
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert rope_settings(overrides)["rope_type"] == "linear" and overrides["max_position_embeddings"] == 64
    assert command[command.index("--max-model-len") + 1] == "64"

    exported = tmp_path / "scaled.gguf"
    export_gguf(str(run), exported, "f32", verify=False, pre_tokenizer="gpt-2")
    fields = GGUFReader(str(exported)).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    assert fields["llama.context_length"].contents() == 64


def test_a_bases_own_scaling_is_kept_and_not_scaled_twice(tmp_path, tiny_model_dir):
    own = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    base = _copy_with_config(tiny_model_dir, tmp_path / "yarn-base", rope_parameters=own)
    result, run = _train(tmp_path, base, seq_len=32)
    assert result.exit_code == 0, result.output
    merged_dir = tmp_path / "merged"
    assert invoke("merge", str(run), "--out", str(merged_dir), "--dtype", "f32").exit_code == 0
    kept = rope_settings(json.loads((merged_dir / "config.json").read_text()))
    assert (kept["rope_type"], kept["factor"], kept["original_max_position_embeddings"]) == ("yarn", 4.0, 64)

    stacked, _ = _train(tmp_path / "again", base, "model.rope_scaling={type: linear, factor: 2}", seq_len=32)
    assert stacked.exit_code == 2 and "the base scales its rope already (yarn, factor 4.0)" in stacked.output


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_each_scaling_type_gives_a_config_transformers_computes_with(tmp_path, tiny_model_dir, kind):
    from transformers import AutoModelForCausalLM

    base = json.loads((tiny_model_dir / "config.json").read_text())
    scaled = with_rope_scaling(base, {"type": kind, "factor": 4})
    assert rope_settings(scaled)["rope_type"] == kind and rope_settings(scaled)["factor"] == 4.0
    # Dynamic NTK scales past max_position_embeddings on its own, so that stays the trained length.
    assert scaled["max_position_embeddings"] == (256 if kind == "dynamic" else 1024)
    check_context(1024, base, {"type": kind, "factor": 4})
    with pytest.raises(ConfigError, match="at least 8"):
        check_context(2048, base, {"type": kind, "factor": 4})
    folder = _copy_with_config(tiny_model_dir, tmp_path / kind, **scaled)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        logits = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert torch.isfinite(logits).all() and (logits - plain).abs().max() > 1e-4


def test_the_transformers_4_layout_gets_rope_scaling_at_the_top_level():
    old = {"max_position_embeddings": 4096, "rope_theta": 10000.0, "model_type": "llama"}
    scaled = with_rope_scaling(old, {"type": "llama3", "factor": 2})
    assert scaled["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    assert "rope_parameters" not in scaled and scaled["max_position_embeddings"] == 8192
    assert old == {"max_position_embeddings": 4096, "rope_theta": 10000.0, "model_type": "llama"}  # a copy

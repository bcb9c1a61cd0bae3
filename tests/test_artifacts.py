"""Typed run artifacts: summary.json and lorafit.json read and written through one class each, with
their keys unchanged; the base weights' fingerprint is of their content."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.adapters.load import check_same_base, locate_trained
from lorafit.artifacts import AdapterRecord, BaseModelRecord, RunFolder, RunSummary
from lorafit.errors import UsageError
from lorafit.model.load import CONTENT_PREFIX, file_listing_fingerprint, resolve_base, weights_fingerprint

# summary.json's keys as README documents them and runs have always written them.
SUMMARY_KEYS = [
    "resumed_from", "base_model", "precision", "device", "steps", "stopped_early", "best_step", "skipped_steps",
    "rollbacks", "micro_batch_size", "grad_accum", "valid_loss_before", "valid_loss_after", "valid_ppl_before",
    "valid_ppl_after", "valid_ppl_change_percent", "train_tokens", "train_seconds", "tokens_per_second", "method",
    "trainable_parameters", "data", "data_problems", "general_ppl_before", "general_ppl_after",
    "general_ppl_change_percent", "saved_to", "saved_bytes", "generations", "tasks", "peak_rss_mb", "wall_seconds",
]  # fmt: skip


def test_a_summary_reads_and_writes_back_the_same_json():
    raw = {key: index for index, key in enumerate(SUMMARY_KEYS)} | {"from_a_newer_lorafit": [1]}
    summary = RunSummary.from_json(raw)
    assert summary.valid_ppl_after == raw["valid_ppl_after"]
    assert summary.to_json() == raw and list(summary.to_json()) == list(raw)


def test_a_summary_leaves_out_what_was_not_measured_and_reads_old_files():
    written = RunSummary(steps=3, method="lora").to_json()
    assert "general_ppl_before" not in written and "tasks" not in written
    assert list(written) == [k for k in SUMMARY_KEYS if k not in RunSummary.OPTIONAL]
    old = RunSummary.from_json({"steps": 3})  # keys missing: None, not an error
    assert old.saved_bytes is None and old.parameter_count("total") is None


def test_an_adapter_record_keeps_every_key_it_does_not_know():
    raw = {
        "lorafit_version": "0.0.9",
        "base_model": {"spec": "", "name": "b", "path": "/b", "weights_fingerprint": "f", "revision": "x"},
        "config": {"train": {}},
        "chat_template": None,
        "custom": {"kept": True},
    }
    record = AdapterRecord.from_json(raw)
    assert isinstance(record.base_model, BaseModelRecord) and record.base_model.weights_fingerprint == "f"
    assert record.to_json() == raw


def test_the_run_folder_knows_its_layout(tmp_path):
    folder = RunFolder(tmp_path)
    assert not folder.is_run() and folder.trained() is None and folder.read_summary() is None
    folder.config.write_text("{}")
    (folder.adapter).mkdir()
    (folder.adapter / "adapter_config.json").write_text("{}")
    folder.summary.write_text(json.dumps({"steps": 2}))
    assert folder.is_run() and folder.finished() and folder.trained() == tmp_path / "adapter"
    assert folder.read_summary().steps == 2
    assert {p.name for p in folder.report_files().values()} == {"report.json", "report.md", "report.html"}


def _copy_with_other_values(source, target):
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    name = sorted(k for k in weights if k.endswith("down_proj.weight"))[0]
    weights[name] = weights[name] + 1e-3  # same names, shapes and file size; other values
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_the_weights_fingerprint_is_of_the_tensors_content(tmp_path, tiny_model_dir):
    other = _copy_with_other_values(tiny_model_dir, tmp_path / "other")
    ours, theirs = resolve_base(str(tiny_model_dir)), resolve_base(str(other))
    assert (tmp_path / "other" / "model.safetensors").stat().st_size == (
        tiny_model_dir / "model.safetensors"
    ).stat().st_size
    assert file_listing_fingerprint(ours) == file_listing_fingerprint(theirs)  # the old one could not tell
    assert weights_fingerprint(ours) != weights_fingerprint(theirs)
    assert weights_fingerprint(ours).startswith(CONTENT_PREFIX)
    assert weights_fingerprint(ours) == weights_fingerprint(resolve_base(str(tiny_model_dir)))  # stable


def test_an_adapter_recording_an_older_fingerprint_still_matches_its_base(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
    ref = resolve_base(str(tiny_model_dir))
    base = {"spec": str(tiny_model_dir), "name": "tiny", "path": ref.path}
    (adapter / "lorafit.json").write_text(
        json.dumps({"base_model": {**base, "weights_fingerprint": file_listing_fingerprint(ref)}})
    )
    located = locate_trained(str(adapter))
    check_same_base(located, ref, weights_fingerprint(ref))  # no refusal

    (adapter / "lorafit.json").write_text(json.dumps({"base_model": {**base, "weights_fingerprint": "0" * 16}}))
    with pytest.raises(UsageError, match="was trained on tiny"):
        check_same_base(locate_trained(str(adapter)), ref, weights_fingerprint(ref))

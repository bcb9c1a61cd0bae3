"""fp16 training: autocast in float16 under a dynamic loss scale. Gradients that overflow float16
skip their step and halve the scale — counted as overflow steps, not as failures — and the scale
is part of a checkpoint, so a resumed fp16 run equals an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import make_corpus, write_config
from test_resume import lorafit, metrics, without_speed

import lorafit as api
from lorafit.model.device import compute_dtype, loss_scaler, resolve_precision


def fp16_config(tmp_path, tiny_model_dir, **train):
    return write_config(tmp_path, tiny_model_dir, make_corpus(tmp_path / "docs"), precision="fp16", **train)


def test_auto_precision_and_the_scaler_follow_the_device():
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert compute_dtype("fp16") is torch.float16
    assert isinstance(loss_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    assert loss_scaler("bf16", torch.device("cpu")) is None and loss_scaler("fp32", torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("fault", "overflows", "skipped"),
    [("overflow_at_step:2", 1, 0), ("nan_at_steps:3", 0, 1)],
    ids=["overflow", "nan"],
)
def test_an_fp16_overflow_is_skipped_and_counted_apart_from_a_nan_step(
    tmp_path, tiny_model_dir, monkeypatch, fault, overflows, skipped
):
    config = fp16_config(tmp_path, tiny_model_dir, max_steps=4, save_every=0)
    monkeypatch.setenv("LORAFIT_FAULT", fault)
    result = api.train(str(config), tmp_path / "run")
    summary = result.summary
    assert summary["precision"] == "fp16"
    # Natural overflows of the first steps may add to the drill's; a NaN loss is never one.
    assert summary["overflow_steps"] >= overflows and summary["skipped_steps"] == skipped
    records = metrics(tmp_path / "run")
    events = [r for r in records if r.get("event") == "overflow"]
    if overflows:
        drill = next(r for r in events if r["step"] == 2)
        assert drill["loss_scale"] < 65536.0  # halved from torch's initial scale
        step = next(r for r in records if r.get("step") == 2 and "loss" in r)
        assert step["loss"] is not None and step["grad_norm"] is None  # the loss was fine, its gradients not
    else:
        assert not any(r["step"] == 3 for r in events)
    assert all(r["loss"] is not None for r in records if "loss" in r and r["step"] != 3)
    assert summary["valid_ppl_after"] < summary["valid_ppl_before"]  # it still trained


def test_fp16_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    config = fp16_config(tmp_path, tiny_model_dir, max_steps=8, save_every=3, eval_every=4)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # An overflow before the checkpoint halves the scale: a resume that forgot it would scale
    # (and round) every later fp16 gradient differently.
    assert lorafit("train", str(config), "--out", str(whole), fault="overflow_at_step:2").returncode == 0
    killed = lorafit("train", str(config), "--out", str(broken), fault="overflow_at_step:2,kill_after_step:4")
    assert killed.returncode < 0
    saved = torch.load(broken / "checkpoints" / "step-3" / "scaler.pt", weights_only=True)
    assert saved["scale"] <= 32768.0
    resumed = lorafit("train", str(config), "--out", str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_speed(metrics(broken)) == without_speed(metrics(whole))
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((broken / "summary.json").read_text())["overflow_steps"]
        == json.loads((whole / "summary.json").read_text())["overflow_steps"]
    )

"""Exact resume: a run killed with SIGKILL and resumed equals an uninterrupted one, bit for bit."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import make_corpus, write_config


def lorafit(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_FAULT"}
    if fault:
        env["LORAFIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "lorafit.cli", *args], capture_output=True, text=True, env=env)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_speed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@pytest.fixture()
def resumable_config(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "docs")
    path = write_config(tmp_path, tiny_model_dir, data, max_steps=10, save_every=3, eval_every=4, keep_checkpoints=2)
    config = yaml.safe_load(path.read_text())
    config["lora"]["dropout"] = 0.1  # draws random numbers every step: the RNG state must resume too
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, resumable_config):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert lorafit("train", str(resumable_config), "--out", str(whole)).returncode == 0

    killed = lorafit("train", str(resumable_config), "--out", str(broken), fault="kill_after_step:7")
    assert killed.returncode == -signal.SIGKILL
    assert not (broken / "summary.json").exists()
    checkpoints = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert checkpoints == ["step-3", "step-6"]  # nothing half-written, the last two kept
    assert max(r["step"] for r in metrics(broken)) == 7  # written before the crash, still readable

    resumed = lorafit("train", str(resumable_config), "--out", str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout

    # Every logged figure (loss, lr, grad norm, tokens, epoch, validations) but the speed is equal.
    assert without_speed(metrics(broken)) == without_speed(metrics(whole))
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-6")
    assert summary["valid_ppl_after"] == json.loads((whole / "summary.json").read_text())["valid_ppl_after"]


def test_resume_from_a_named_checkpoint_and_refusal_of_changed_inputs(tmp_path, resumable_config):
    run = tmp_path / "run"
    assert lorafit("train", str(resumable_config), "--out", str(run), fault="kill_after_step:4").returncode < 0
    resume_step_3 = [
        "train",
        str(resumable_config),
        "--out",
        str(run),
        "--resume",
        str(run / "checkpoints" / "step-3"),
        "--set",
        "train.lr=0.5",
    ]
    changed = lorafit(*resume_step_3)
    assert changed.returncode == 2
    assert "train.lr: 0.005 -> 0.5" in " ".join(changed.stdout.split()) and "--ignore-changes" in changed.stdout
    assert "Traceback" not in changed.stdout + changed.stderr
    forced = lorafit(*resume_step_3, "--ignore-changes")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 11))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, resumable_config):
    missing = lorafit("train", str(resumable_config), "--out", str(tmp_path / "nothing"), "--resume")
    assert missing.returncode == 2 and "holds no run to resume" in missing.stdout


@pytest.mark.parametrize(("fault", "name"), [("term_after_step", "SIGTERM"), ("int_after_step", "SIGINT")])
def test_sigterm_or_ctrl_c_finishes_the_step_checkpoints_and_says_how_to_resume(
    tmp_path, resumable_config, fault, name
):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert lorafit("train", str(resumable_config), "--out", str(whole)).returncode == 0
    term = lorafit("train", str(resumable_config), "--out", str(stopped), fault=f"{fault}:5")
    assert term.returncode == 130
    message = " ".join(term.stdout.split())
    assert f"Stopped by {name} after step 5" in message and "--resume" in message
    assert "Traceback" not in term.stdout + term.stderr
    assert (stopped / "checkpoints" / "step-5" / "state.json").is_file()  # written although 5 % 3 != 0
    resumed = lorafit("train", str(resumable_config), "--out", str(stopped), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_speed(metrics(stopped)) == without_speed(metrics(whole))


def test_resume_into_a_different_lora_shape_is_a_clear_error(tmp_path, resumable_config):
    run = tmp_path / "run"
    assert lorafit("train", str(resumable_config), "--out", str(run), fault="kill_after_step:4").returncode < 0
    reshaped = lorafit(
        "train", str(resumable_config), "--out", str(run), "--resume", "--set", "lora.r=8", "--ignore-changes"
    )
    assert reshaped.returncode == 2
    assert "do not fit this model/LoRA set-up" in " ".join(reshaped.stdout.split())
    assert "Traceback" not in reshaped.stdout + reshaped.stderr

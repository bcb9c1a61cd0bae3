"""Drills: non-finite losses are skipped, rolled back or diagnosed; out-of-memory halves the micro-batch."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_cli import invoke, make_corpus, write_config

from lorafit.data.pack import documents_in_blocks
from lorafit.training import faults


@pytest.fixture()
def drill(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(faults, "_fired", set())
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data, max_steps=8, save_every=3, eval_every=0)

    def run(name: str, fault: str | None = None):
        if fault:
            monkeypatch.setenv(faults.ENV, fault)
        else:
            monkeypatch.delenv(faults.ENV, raising=False)
        out = tmp_path / name
        result = invoke("train", str(config), "--out", str(out))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if out.exists() else []
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        return result, lines, summary, out

    return run


def test_a_non_finite_step_is_skipped_and_counted(drill):
    result, lines, summary, out = drill("nan-once", "nan_at_steps:4")
    assert result.exit_code == 0, result.output
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 0
    assert [(r["loss"], r["grad_norm"]) for r in lines if r.get("step") == 4 and "lr" in r] == [(None, None)]
    assert "NaN" not in (out / "metrics.jsonl").read_text()  # strict JSON for other readers
    assert (out / "report.html").is_file()  # the skipped step is a gap in the report's loss curve
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_steps_in_a_row_roll_back_with_a_lower_learning_rate(drill):
    result, lines, summary, _ = drill("nan-run", "nan_at_steps:4-6")
    assert result.exit_code == 0, result.output
    assert summary["rollbacks"] == 1 and summary["steps"] == 8
    assert {"step": 3, "event": "rollback", "lr_scale": 0.5} in lines
    steps = [r for r in lines if "lr" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # the failed attempt's lines were dropped
    assert all(r["loss"] is not None for r in steps)
    assert "rolled back" in " ".join(result.output.split())


def test_persistent_non_finite_loss_stops_with_a_diagnosis(drill):
    result, _, summary, out = drill("nan-forever", "nan_from_step:5")
    assert result.exit_code == 1 and summary is None
    message = " ".join(result.output.split())
    assert "Training is unstable" in message and "up to step" in message
    # The source documents of the failing batch, by file name (the advice text says "documents" too).
    named = re.search(r"last batch from: (.*?)\); last good", message)
    assert named and re.fullmatch(r"(\S+/docs/(doc\d+\.txt|page\.html)(, | \.\.\.)?)+", named.group(1)), message
    assert "last good checkpoint" in message and "step-3" in message
    assert "Traceback" not in result.output
    assert (out / "checkpoints" / "step-3" / "state.json").is_file()  # nothing lost


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(drill):
    _, clean_lines, clean, _ = drill("clean")
    result, lines, summary, _ = drill("oom", "oom_at_step:3")
    assert result.exit_code == 0, result.output
    assert (summary["micro_batch_size"], summary["grad_accum"]) == (1, 4)  # from 2 x 2
    assert {"step": 3, "event": "out_of_memory", "micro_batch_size": 1, "grad_accum": 4} in lines
    # Same blocks per step, token-normalised: the same training up to float summation order.
    losses = [r["loss"] for r in lines if "lr" in r]
    assert losses == pytest.approx([r["loss"] for r in clean_lines if "lr" in r], rel=1e-4)
    assert summary["train_tokens"] == clean["train_tokens"]


def test_documents_in_blocks_traces_blocks_to_sources():
    # documents of 3, 5 and 2 tokens (+ EOS each): stream of 13 tokens, blocks of 4
    assert documents_in_blocks([3, 5, 2], 4, [0]) == [0]
    assert documents_in_blocks([3, 5, 2], 4, [1]) == [1]
    assert documents_in_blocks([3, 5, 2], 4, [2]) == [1, 2]
    assert documents_in_blocks([3, 5, 2], 4, [0, 2]) == [0, 1, 2]


def test_progress_bar_keeps_one_row_across_a_rollback():
    import io

    from rich.console import Console

    from lorafit.training.progress import training_progress, training_task

    progress = training_progress(Console(file=io.StringIO()))
    first = training_task(progress, total=8, completed=0)
    progress.update(first, advance=5)
    again = training_task(progress, total=8, completed=3)  # rolled back to the step-3 checkpoint
    assert again == first and len(progress.tasks) == 1
    assert progress.tasks[0].completed == 3

"""The checkpoint policy on its own, without a CLI run: when a step's end writes a checkpoint, how a
rollback lands and lowers the learning rate, when it gives up, what an interruption saves, and
how a resume refuses changed inputs."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.artifacts import RunFolder
from lorafit.config import TrainSection
from lorafit.errors import LorafitError, UsageError
from lorafit.training.checkpoint import list_checkpoints
from lorafit.training.checkpointer import Checkpointer
from lorafit.training.loop import LoopState, UnstableTrainingError


@pytest.fixture()
def make_checkpointer(tmp_path):
    def make(**train) -> tuple[Checkpointer, torch.nn.Module, list[dict]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logged: list[dict] = []
        settings = {"max_steps": 10, "save_every": 3, "keep_checkpoints": 2, "max_rollbacks": 2, **train}
        checkpointer = Checkpointer(
            folder=RunFolder(tmp_path / "run"),
            model=model,
            optimizer=optimizer,
            train=TrainSection(**settings),
            fingerprints={"config": {"train.lr": 1e-2}, "train_data": "a", "valid_data": "b", "base_model": "c"},
            log_metrics=lambda record: (logged.append(record), _append(tmp_path / "run" / "metrics.jsonl", record)),
            base_record={"before": {"nll_sum": 5.0, "tokens": 2}, "general_before": None},
        )
        return checkpointer, model, logged

    return make


def _append(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _steps(checkpointer) -> list[str]:
    return [p.name for p in list_checkpoints(checkpointer.folder.checkpoints)]


def test_checkpoints_every_save_every_steps_and_at_the_end_keeping_the_newest(make_checkpointer):
    checkpointer, _, _ = make_checkpointer()
    for step in range(1, 11):
        checkpointer.on_step_end(LoopState(step=step), {"epoch": 0, "index": step})
    assert _steps(checkpointer) == ["step-9", "step-10"]  # 3, 6, 9 and the last; two kept
    record = json.loads((checkpointer.folder.checkpoints / "step-10" / "state.json").read_text())
    assert record["position"] == {"epoch": 0, "index": 10} and record["before"] == {"nll_sum": 5.0, "tokens": 2}
    assert checkpointer.last_position == {"epoch": 0, "index": 10}


def test_no_checkpoint_in_the_middle_of_non_finite_steps(make_checkpointer):
    checkpointer, _, _ = make_checkpointer()
    checkpointer.on_step_end(LoopState(step=3, bad_in_row=1), {"epoch": 0, "index": 3})
    assert _steps(checkpointer) == []
    checkpointer.on_step_end(LoopState(step=6), {"epoch": 0, "index": 6})
    assert _steps(checkpointer) == ["step-6"]


def test_a_rollback_restores_the_newest_checkpoint_with_a_lower_learning_rate(make_checkpointer):
    checkpointer, model, logged = make_checkpointer(rollback_lr_factor=0.25)
    saved_weight = model.weight.detach().clone()
    checkpointer.save(LoopState(step=3), {"epoch": 0, "index": 6})
    with torch.no_grad():
        model.weight.add_(1.0)  # the weights the non-finite steps left
    state, position = checkpointer.roll_back(UnstableTrainingError(step=5, blocks=[0]), "doc.txt")
    assert state.step == 3 and position == {"epoch": 0, "index": 6}
    assert torch.equal(model.weight, saved_weight)
    assert state.rollback_lr_scale == 0.25 and checkpointer.rollbacks == 1
    assert logged[-1] == {"step": 3, "event": "rollback", "lr_scale": 0.25}


def test_rollbacks_stop_with_a_diagnosis_when_none_is_left(make_checkpointer):
    checkpointer, _, _ = make_checkpointer(max_rollbacks=1)
    with pytest.raises(LorafitError, match=r"last batch from: a\.txt.*none \(set train\.save_every\)"):
        checkpointer.roll_back(UnstableTrainingError(step=2, blocks=[0]), "a.txt")
    checkpointer.save(LoopState(step=3), {"epoch": 0, "index": 3})
    checkpointer.roll_back(UnstableTrainingError(step=5, blocks=[0]), "a.txt")
    with pytest.raises(LorafitError, match=r"1 rollback\(s\) tried"):
        checkpointer.roll_back(UnstableTrainingError(step=5, blocks=[0]), "a.txt")


def test_an_interruption_reuses_the_checkpoint_of_its_step_or_writes_one(make_checkpointer):
    checkpointer, _, _ = make_checkpointer()
    first = checkpointer.saved_or_save(LoopState(step=4), {"epoch": 0, "index": 4})
    stamp = (first / "state.json").stat().st_mtime_ns
    again = checkpointer.saved_or_save(LoopState(step=4), {"epoch": 0, "index": 99})
    assert again == first and (first / "state.json").stat().st_mtime_ns == stamp


def test_resume_refuses_changed_inputs_and_cuts_the_metrics_back(make_checkpointer, tmp_path):
    checkpointer, model, _ = make_checkpointer()
    _append(checkpointer.folder.metrics, {"step": 1, "loss": 1.0})
    checkpointer.save(LoopState(step=1), {"epoch": 0, "index": 2})
    _append(checkpointer.folder.metrics, {"step": 2, "loss": 0.9})  # written after the checkpoint
    checkpointer.folder.config.write_text("{}")
    resumed = checkpointer.resume("latest", ignore_changes=False)
    assert resumed.state.step == 1 and resumed.position == {"epoch": 0, "index": 2}
    assert [json.loads(x)["step"] for x in checkpointer.folder.metrics.read_text().splitlines()] == [1]
    assert checkpointer.base_record["before"] == {"nll_sum": 5.0, "tokens": 2}

    checkpointer.fingerprints = {**checkpointer.fingerprints, "config": {"train.lr": 0.5}}
    with pytest.raises(UsageError, match=r"train\.lr: 0\.01 -> 0\.5"):
        checkpointer.resume("latest", ignore_changes=False)
    assert checkpointer.resume("latest", ignore_changes=True).state.step == 1


def test_a_checkpoint_of_an_earlier_lorafit_keeps_its_rollback_factor(make_checkpointer):
    checkpointer, _, _ = make_checkpointer()
    saved = checkpointer.save(LoopState(step=2, rollback_lr_scale=0.5), {"epoch": 0, "index": 2})
    state_file = saved / "state.json"
    record = json.loads(state_file.read_text())
    record["loop"]["lr_scale"] = record["loop"].pop("rollback_lr_scale")  # the key it had then
    state_file.write_text(json.dumps(record))
    checkpointer.folder.config.write_text("{}")
    assert checkpointer.resume(str(saved), ignore_changes=False).state.rollback_lr_scale == 0.5

"""train.report_to (TensorBoard, MLflow, W&B offline) read back with each tool's own reader, a
killed and resumed run continuing the same tracker runs without duplicated steps; the LoRA
monitor (train.monitor_every) and the report's LoRA health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import make_corpus, write_config

from lorafit.errors import ConfigError
from lorafit.model.lora_norms import ModuleNorms, aggregate, delta_norm, module_norms
from lorafit.training.lora_monitor import PATIENCE, LoraMonitor
from lorafit.training.trackers import check_trackers_installed, flat_scalars, tracker_values


def lorafit(*args: str, home: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_FAULT"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", LORAFIT_HOME=str(home), TRACKIO_DIR=str(home / "trackio"))
    env.pop("MLFLOW_TRACKING_URI", None)
    if fault:
        env["LORAFIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "lorafit.cli", *args], capture_output=True, text=True, env=env)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wandb_records(path: Path) -> list:
    """A W&B run file (.wandb: a LevelDB-style log of protobuf records after a 7-byte header),
    read with W&B's own record schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        room = 32768 - position % 32768  # records never straddle a 32 KiB block's last 6 bytes
        if room < 7:
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One run killed after step 7 (checkpoints at 3 and 6) and resumed, reporting to all four."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(
        tmp_path,
        tiny_model_dir,
        make_corpus(tmp_path / "docs"),
        max_steps=10,
        save_every=3,
        eval_every=4,
        monitor_every=2,
        report_to=["tensorboard", "mlflow", "wandb", "trackio"],
    )
    run = tmp_path / "run"
    killed = lorafit("train", str(config), "--out", str(run), home=home, fault="kill_after_step:7")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # A setting a resume may change (data.workers): MLflow must not be sent the config again.
    resumed = lorafit("train", str(config), "--out", str(run), "--resume", "--set", "data.workers=1", home=home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return run


def test_tensorboard_events_hold_every_step_once_across_the_resume(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {r["step"]: r["loss"] for r in metrics(tracked_run) if "loss" in r}
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == list(range(1, 11))  # steps 7 sent before the kill are not sent again
    assert [e.value for e in losses] == pytest.approx([logged[s] for s in range(1, 11)], rel=1e-6)
    assert [e.step for e in events.Scalars("valid_loss")] == [0, 4, 8, 10]
    assert [e.step for e in events.Scalars("lora_norms/by_type/q_proj/delta")] == [2, 4, 6, 8, 10]
    tags = events.Tags()
    assert any(tag.startswith("summary/") for tag in tags["scalars"])
    assert "report/LoRA change by layer and module type" in tags["images"]


def test_mlflow_run_queried_back_with_its_client(tracked_run):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked_run / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lorafit")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the same run
    run = runs[0]
    assert run.info.run_name == tracked_run.name
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "10"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert run.data.metrics["summary/valid_ppl_after"] == pytest.approx(summary["valid_ppl_after"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.html"}


def test_wandb_offline_files_continue_one_run(tracked_run):
    files = sorted((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the killed attempt and the resumed one
    ids, config_keys = set(), set()
    for path in files:
        steps = []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                assert record.run.display_name == tracked_run.name
            elif kind == "config":
                config_keys |= {item.key for item in record.config.update}
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "loss" in row:
                    steps.append(row["_step"])
    assert len(ids) == 1
    # W&B writes in the background: what a killed process had logged may be lost, so the resumed
    # attempt sends again every line W&B had not stored at a clean close (here: all of them, once).
    assert steps == list(range(1, 11))
    assert {"lora.r", "train.lr"} <= config_keys


def test_trackio_store_queried_back_with_its_own_storage(tracked_run):
    # trackio reads TRACKIO_DIR when it is imported: queried in a process of its own.
    query = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        f"print(json.dumps([S.get_runs('lorafit'), S.get_logs('lorafit', {tracked_run.name!r})]))"
    )
    env = dict(os.environ, TRACKIO_DIR=str(tracked_run.parent / "home" / "trackio"))
    found = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, env=env, check=True)
    runs, logs = json.loads(found.stdout.strip().splitlines()[-1])
    assert runs == [tracked_run.name]  # the resume continued the same run
    loss_steps = [row["step"] for row in logs if "loss" in row]
    # trackio writes in the background like W&B: the resumed process sent every step again, in order.
    assert loss_steps[-10:] == list(range(1, 11))
    assert any(key.startswith("lora_norms/by_type/") for row in logs for key in row)


def test_monitor_records_and_report_heat_map(tracked_run):
    records = [r for r in metrics(tracked_run) if r.get("event") == "lora_norms"]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert set(records[-1]["by_type"]) == {"q_proj", "v_proj"} and set(records[-1]["by_layer"]) == {"0", "1"}
    assert records[-1]["by_type"]["q_proj"]["delta"] > records[0]["by_type"]["q_proj"]["delta"] > 0
    report = json.loads((tracked_run / "report.json").read_text())
    changes = report["lora_health"]["change_map"]
    assert changes["layers"] == [0, 1] and changes["types"] == ["q_proj", "v_proj"]
    assert all(value > 0 for row in changes["relative"] for value in row)
    assert [p[0] for p in report["lora_health"]["curves"]["q_proj"]] == [2, 4, 6, 8, 10]
    html = (tracked_run / "report.html").read_text()
    assert "alt='LoRA change by layer and module type'" in html and "LoRA health" in html


def test_delta_norm_through_r_by_r_products_equals_the_full_matrix():
    torch.manual_seed(0)
    a, b = torch.randn(8, 300, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    assert delta_norm(a, b, 0.5) == pytest.approx(float((0.5 * b @ a).norm()), rel=1e-10)
    assert delta_norm(a, torch.zeros(200, 8), 2.0) == 0.0


def test_aggregate_is_the_norm_of_the_stacked_changes():
    norms = [
        ModuleNorms("layers.0.q_proj", 0, "q_proj", 3.0, 10.0, 1.0, 2.0),
        ModuleNorms("layers.1.q_proj", 1, "q_proj", 4.0, 10.0, None, None),
    ]
    grouped = aggregate(norms)
    assert grouped["by_type"]["q_proj"]["delta"] == pytest.approx(5.0)
    assert grouped["by_type"]["q_proj"]["relative"] == pytest.approx(5.0 / 200**0.5, rel=1e-5)  # 6 digits kept
    assert grouped["by_layer"]["1"]["grad_a"] is None
    assert tracker_values({"step": 2, "event": "lora_norms", **grouped})["lora_norms/by_type/q_proj/delta"] == 5.0
    assert flat_scalars({"a": True, "b": None, "c": float("nan"), "d": 1}) == {"d": 1}


def test_monitor_flags_a_module_whose_learning_rate_is_zero_and_not_the_others(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.config import LoraSection
    from lorafit.model.lora import apply_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_lora(model, LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0))
    frozen_name = "layers.0.self_attn.q_proj"
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and frozen_name in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and frozen_name not in n]
    assert len(frozen) == 2 and others
    optimizer = torch.optim.AdamW([{"params": others, "lr": 1e-3}, {"params": frozen, "lr": 0.0}])
    warnings: list[str] = []
    logged: list[dict] = []
    monitor = LoraMonitor(model, every=1, log_metrics=logged.append, warn=warnings.append)
    ids = torch.randint(0, 300, (2, 16))
    for step in range(1, PATIENCE + 3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.check(step)
        optimizer.step()
        optimizer.zero_grad()
    flagged = {(r["module"], r["kind"]) for r in logged if r.get("event") == "lora_warning"}
    assert {kind for _, kind in flagged} == {"b_zero", "vanishing"}
    assert all(module.endswith(frozen_name) for module, _ in flagged)
    assert len(warnings) == 2 and all(frozen_name in w for w in warnings)
    final = {n.name.split(".layers.")[-1]: n for n in module_norms(model)}
    assert final["0.self_attn.q_proj"].delta == 0.0 and final["1.self_attn.q_proj"].delta > 0


class BrokenTracker:
    """A tracker whose backend has gone away (a tracking server down): every call raises."""

    def log(self, values, step=None):
        raise ConnectionError("tracking server unreachable")

    def finish(self):
        raise ConnectionError("tracking server unreachable")


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_and_the_rest_go_on(tmp_path):
    from lorafit.artifacts import RunFolder
    from lorafit.training.trackers import RunTrackers

    class Kept:
        def __init__(self):
            self.logged = []

        def log(self, values, step=None):
            self.logged.append((step, values))

        def finish(self):
            pass

    kept, warnings = Kept(), []
    state = {"mlflow": {"lines": 2}, "tensorboard": {"lines": 2}}
    trackers = RunTrackers(
        RunFolder(tmp_path), {"mlflow": BrokenTracker(), "tensorboard": kept}, state, lines=2, warn=warnings.append
    )
    trackers.sent = {"mlflow": 2, "tensorboard": 2}
    trackers.send({"step": 3, "loss": 1.5})
    trackers.send({"step": 4, "loss": 1.25})
    assert kept.logged == [(3, {"loss": 1.5}), (4, {"loss": 1.25})]
    assert len(warnings) == 1 and "mlflow failed" in warnings[0] and "unreachable" in warnings[0]
    saved = json.loads((tmp_path / "trackers.json").read_text())
    assert saved["mlflow"]["lines"] == 2 and saved["tensorboard"]["lines"] == 4  # a resume backfills mlflow


def test_a_tracker_without_its_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'lorafit\[wandb\]'"):
        check_trackers_installed(["tensorboard", "wandb"])


def test_report_to_is_checked_by_the_config(tmp_path, tiny_model_dir):
    from test_cli import invoke

    config = write_config(tmp_path, tiny_model_dir, make_corpus(tmp_path / "docs"))
    data = yaml.safe_load(config.read_text())
    data["train"]["report_to"] = ["tensorbored"]
    config.write_text(yaml.safe_dump(data))
    result = invoke("train", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "train.report_to" in result.output and "tensorboard" in result.output
    assert not (tmp_path / "run").exists()

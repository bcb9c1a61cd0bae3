"""train.report_to: TensorBoard, W&B, MLflow and trackio receive what metrics.jsonl holds, through
accelerate's trackers (accelerate.tracking; lorafit writes no event file or API call of its own).

metrics.jsonl stays the run's record; the trackers follow it. `trackers.json` in the run folder
keeps, per tracker, its run id (W&B, MLflow) and how many metrics lines it has received. A resumed
run reopens the same tracker run and sends only the lines it has not seen: the lines up to the
checkpoint are backfilled where a tracker missed them (one added at --resume gets the whole
history), and the ones an interrupted attempt already sent past the checkpoint are not sent twice
(an exact resume recomputes the same values).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.artifacts import RunFolder
from lorafit.errors import ConfigError, LorafitError
from lorafit.integrity import read_json_file
from lorafit.io import write_json_atomic

# Trackers that store each log call before it returns (TensorBoard flushes its event file, MLflow
# commits to its store). W&B and trackio hand logs to a background writer: a process killed
# outright (SIGKILL, the OOM killer) loses what it had not written, so their lines count as received
# only once their run was closed cleanly, and a resume after a kill sends the rest again.
STORED_ON_LOG = {"tensorboard", "mlflow"}

# tracker -> (the module it needs, the lorafit extra that installs it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


def check_trackers_installed(report_to: list[str]) -> None:
    """Refuse, before any work, a tracker whose package is missing, naming the extra."""
    for name in report_to:
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the {module} package, which is not installed; install it with: "
                f"pip install 'lorafit[{extra}]' (or remove {name} from train.report_to)."
            )


def flat_scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, nested keys joined with '/' ('lora_norms/by_type/q_proj/delta');
    booleans, strings, None and non-finite values are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out


def tracker_values(record: dict) -> dict[str, float]:
    """What a tracker gets from one metrics line: its numbers, an event's under the event's name."""
    body = {k: v for k, v in record.items() if k not in ("step", "event")}
    event = record.get("event")
    return flat_scalars(body, f"{event}/" if isinstance(event, str) else "")


def hyperparameters(config: dict) -> dict[str, str | int | float | bool]:
    """The resolved config as 'section.key' -> a value every tracker takes (lists and None as text)."""
    flat: dict[str, str | int | float | bool] = {}
    for section, values in config.items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


@dataclass
class RunTrackers:
    """The run's open trackers and what each has received (saved in trackers.json)."""

    folder: RunFolder
    trackers: dict[str, object]  # name -> accelerate GeneralTracker
    state: dict[str, dict] = field(default_factory=dict)  # trackers.json: lines each has stored, run ids
    lines: int = 0  # metrics.jsonl lines so far
    sent: dict[str, int] = field(default_factory=dict)  # lines handed to each tracker in this process
    warn: Callable[[str], None] = lambda message: None

    def send(self, record: dict) -> None:
        """The metrics line just appended (line number self.lines + 1)."""
        self.lines += 1
        step, values = record.get("step"), tracker_values(record)
        for name, tracker in list(self.trackers.items()):
            if self.lines > self.sent[name]:
                if values and not self._attempt(name, lambda t=tracker: t.log(values, step=step)):
                    continue
                self.sent[name] = self.lines
                if name in STORED_ON_LOG:
                    self.state[name]["lines"] = self.lines
        self._save()

    def _attempt(self, name: str, call: Callable[[], object]) -> bool:
        """A tracker call; one that fails (a server down, a full disk) drops that tracker for the rest
        of this process with a warning, and training goes on: metrics.jsonl still has every line,
        and a later --resume sends the tracker what it missed."""
        try:
            call()
            return True
        except Exception as error:  # noqa: BLE001 - any tracker failure, reported and contained
            self.warn(f"train.report_to: {name} failed ({type(error).__name__}: {error}); it gets no more lines now")
            tracker = self.trackers.pop(name)
            with contextlib.suppress(Exception):
                tracker.finish()
            return False

    def finish_run(self, summary: dict, step: int, report_files: dict[str, Path] | None) -> None:
        """The final summary's numbers, and the report: its plots as images, its files as MLflow artifacts."""
        values = flat_scalars({k: v for k, v in summary.items() if k not in ("step",)}, "summary/")
        plots = _report_plots(report_files)
        for name, tracker in list(self.trackers.items()):
            if values and not self._attempt(name, lambda t=tracker: t.log(values, step=step)):
                continue
            if name == "mlflow" and report_files:
                self._attempt(name, lambda t=tracker: [t.log_artifact(str(p), "report") for p in report_files.values()])
            elif name in ("tensorboard", "wandb") and plots:
                self._attempt(name, lambda t=tracker, n=name: _log_images(n, t, plots, step))

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            # A tracker failing to close must not hide the run's outcome.
            with contextlib.suppress(Exception):
                tracker.finish()
                # Written out by now (what STORED_ON_LOG trackers had stored already).
                self.state[name].update(lines=self.sent[name], config_logged=True)
        if self.trackers:
            self._save()
        self.trackers = {}

    def _save(self) -> None:
        write_json_atomic(self.folder.trackers, self.state)


def open_trackers(
    report_to: list[str], project: str, folder: RunFolder, config: dict, warn: Callable[[str], None]
) -> RunTrackers | None:
    """Start (or continue, from trackers.json) each tracker of train.report_to and send it the
    metrics lines it has not received yet. Call on the first process only, after a resume has cut
    metrics.jsonl back to its checkpoint."""
    if not report_to:
        return None
    state = read_json_file(folder.trackers) if folder.trackers.is_file() else {}
    trackers: dict[str, object] = {}
    lines = _metrics_lines(folder.metrics)
    opened = RunTrackers(folder, trackers, state, lines=len(lines), warn=warn)
    name = ""
    try:
        for name in report_to:
            entry = state.setdefault(name, {"lines": 0})
            tracker = _make_tracker(name, project, folder, entry)
            tracker.start()
            trackers[name] = tracker
            if name == "mlflow":
                entry["run_id"] = tracker.active_run.info.run_id
            if not entry.get("config_logged"):
                # Once per tracker run: MLflow refuses a parameter logged again with another value
                # (a resume may change data.workers, say).
                tracker.store_init_configuration(hyperparameters(config))
                entry["config_logged"] = name in STORED_ON_LOG  # the others: once closed cleanly
            # Backfill what it missed (all of it for a new tracker); never resend what it has.
            for number, record in enumerate(lines, 1):
                if number > entry["lines"] and (values := tracker_values(record)):
                    tracker.log(values, step=record.get("step"))
            opened.sent[name] = max(entry["lines"], len(lines))
            if name in STORED_ON_LOG:
                entry["lines"] = opened.sent[name]
    except Exception as error:  # noqa: BLE001 - named below with the tracker that failed
        opened.close()
        raise LorafitError(
            f"train.report_to: {name} could not start or catch up ({type(error).__name__}: {error}). Check its "
            f"settings (WANDB_*, MLFLOW_TRACKING_URI, TRACKIO_DIR) or remove {name} from train.report_to; "
            "nothing was trained yet."
        ) from error
    opened._save()
    return opened


def _make_tracker(name: str, project: str, folder: RunFolder, entry: dict):
    from accelerate import tracking

    run_name = folder.root.resolve().name
    if name == "tensorboard":
        return tracking.TensorBoardTracker("", str(folder.root / "tensorboard"))
    if name == "wandb":
        entry.setdefault("id", uuid.uuid4().hex[:12])
        return tracking.WandBTracker(project, name=run_name, id=entry["id"], resume="allow", dir=str(folder.root))
    if name == "mlflow":
        import mlflow

        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's own default is a store in the working directory; the run folder keeps it with
            # the run (SQLite: MLflow 3 refuses new file stores), artifacts beside it.
            store = folder.root / "mlruns"
            store.mkdir(exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{(store / 'mlflow.db').resolve()}")
            artifacts = (store / "artifacts").resolve().as_uri()
        return tracking.MLflowTracker(
            experiment_name=project, logging_dir=artifacts, run_id=entry.get("run_id"), run_name=run_name
        )
    if name == "trackio":
        return tracking.TrackioTracker(project, name=run_name, resume="allow")
    raise ValueError(f"unknown tracker {name}")


def _metrics_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({})  # a line cut by a crash still counts as a line
    return records


def _report_plots(report_files: dict[str, Path] | None) -> dict[str, bytes]:
    if not report_files or not report_files.get("report.json", Path()).is_file():
        return {}
    import base64

    from lorafit.evaluation.plots import report_plots

    return {
        caption: base64.b64decode(png)
        for caption, png in report_plots(read_json_file(report_files["report.json"])).items()
    }


def _log_images(name: str, tracker, plots: dict[str, bytes], step: int) -> None:
    import io

    import numpy as np
    from matplotlib.image import imread

    images = {caption: np.asarray(imread(io.BytesIO(png), format="png")) for caption, png in plots.items()}
    if name == "tensorboard":
        for caption, image in images.items():
            tracker.tracker.add_image(f"report/{caption}", image, global_step=step, dataformats="HWC")
        tracker.tracker.flush()
    else:
        tracker.log_images({f"report/{caption}": [image] for caption, image in images.items()}, step=step)

"""The runs `lorafit ui` shows, read from their folders (never from the server's memory): a run
started from a shell shows up like one started from the page, and a restarted server sees the same.

Status of a run folder (one holding config.yaml or summary.json):
- running: a process holds the folder's lock (`.lorafit-lock`, flock; seen in /proc/locks);
- finished: summary.json is written;
- stopped: not running, not finished, with a checkpoint to resume from;
- failed: not running, not finished, and nothing to resume (it stopped before its first checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafit.artifacts import RunFolder
from lorafit.integrity import read_json_file
from lorafit.outputs import LOCK

RUN_NAME = re.compile(r"^[\w][\w.+-]{0,127}$")
LAUNCH_LOG = "ui-launch.log"  # what a run started from the page printed (in its run folder)


class RunNotFoundError(LookupError):
    pass


@dataclass
class RunView:
    name: str
    status: str
    pid: int | None
    steps: int  # the last logged optimizer step
    max_steps: int | None
    checkpoints: int
    has_report: bool
    valid_ppl_before: float | None = None
    valid_ppl_after: float | None = None
    trainable: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run_folder(root: Path, name: str) -> Path:
    """`root/name` for a run directly under `root`; anything else (another path, '..') is not found."""
    if not RUN_NAME.match(name):
        raise RunNotFoundError(name)
    folder = (root / name).resolve()
    if folder.parent != root.resolve() or not RunFolder(folder).is_run():
        raise RunNotFoundError(name)
    return folder


def list_runs(root: Path) -> list[RunView]:
    if not root.is_dir():
        return []
    runs = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and RUN_NAME.match(entry.name) and RunFolder(entry).is_run():
            runs.append(describe_run(entry))
    return runs


def list_reports(root: Path) -> list[str]:
    """`lorafit eval` report folders under `root` (a report.html and no run: runs list their own)."""
    if not root.is_dir():
        return []
    return [
        entry.name
        for entry in sorted(root.iterdir())
        if entry.is_dir()
        and RUN_NAME.match(entry.name)
        and (entry / "report.html").is_file()
        and not RunFolder(entry).is_run()
    ]


def report_file(root: Path, name: str) -> Path:
    """report.html of run or report folder `name` directly under `root`."""
    if not RUN_NAME.match(name):
        raise RunNotFoundError(name)
    folder = (root / name).resolve()
    if folder.parent != root.resolve() or not (folder / "report.html").is_file():
        raise RunNotFoundError(name)
    return folder / "report.html"


def lock_holder(folder: Path) -> int | None:
    """The pid holding the folder's lock, from the kernel's table of flock locks (Linux)."""
    lock = folder / LOCK
    try:
        found = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    # The kernel names a locked file "MAJOR:MINOR:INODE" (hex device numbers).
    file_id = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 00:2e:1234567 0 EOF" (a waiter's line reads "1: -> FLOCK ...")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            return int(fields[4])
    return None


def describe_run(folder: Path) -> RunView:
    run = RunFolder(folder)
    pid = lock_holder(folder)
    checkpoints = len(list(run.checkpoints.glob("step-*"))) if run.checkpoints.is_dir() else 0
    summary = _json(run.summary)
    if pid is not None:
        status = "running"
    elif summary is not None:
        status = "finished"
    else:
        status = "stopped" if checkpoints else "failed"
    config = _config(folder)
    return RunView(
        name=folder.name,
        status=status,
        pid=pid,
        steps=_last_step(run.metrics),
        max_steps=((config or {}).get("train") or {}).get("max_steps"),
        checkpoints=checkpoints,
        has_report=run.report.is_file(),
        valid_ppl_before=(summary or {}).get("valid_ppl_before"),
        valid_ppl_after=(summary or {}).get("valid_ppl_after"),
        trainable=((summary or {}).get("trainable_parameters") or {}).get("trainable"),
    )


def describe_run_if_any(folder: Path) -> str | None:
    """The status of `folder`, or None while it is not a run folder yet (a run starting)."""
    return describe_run(folder).status if RunFolder(folder).is_run() else None


def run_details(folder: Path) -> dict:
    """What the page shows of one run: its view, config (as written), summary, data stats."""
    run = RunFolder(folder)
    return {
        "run": describe_run(folder).to_json(),
        "config_yaml": run.config.read_text(encoding="utf-8") if run.config.is_file() else "",
        "summary": _json(run.summary),
        "data": _json(folder / "data" / "stats.json"),
    }


COMPARED = (
    ("validation perplexity before", "valid_ppl_before"),
    ("validation perplexity after", "valid_ppl_after"),
    ("validation perplexity change %", "valid_ppl_change_percent"),
    ("general-text perplexity after", "general_ppl_after"),
    ("general-text perplexity change %", "general_ppl_change_percent"),
    ("steps", "steps"),
    ("best step", "best_step"),
    ("train tokens", "train_tokens"),
    ("tokens/s", "tokens_per_second"),
    ("peak RSS MB", "peak_rss_mb"),
    ("wall seconds", "wall_seconds"),
)


def _flat(config: dict | None) -> dict[str, object]:
    return {
        f"{section}.{key}": value
        for section, values in (config or {}).items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def compare_runs(first: Path, second: Path) -> dict:
    """Two runs side by side: their summaries' figures, task metrics, and the config keys that differ."""
    summaries = [_json(RunFolder(folder).summary) or {} for folder in (first, second)]
    rows = [[label, *(s.get(key) for s in summaries)] for label, key in COMPARED]
    trainable = [(s.get("trainable_parameters") or {}).get("trainable") for s in summaries]
    rows.append(["trainable parameters", *trainable])
    tasks = [((s.get("tasks") or {}).get("adapter") or {}) for s in summaries]
    for metric in sorted(set(tasks[0]) | set(tasks[1])):
        if isinstance(tasks[0].get(metric, tasks[1].get(metric)), (int, float)):
            rows.append([f"task {metric}", tasks[0].get(metric), tasks[1].get(metric)])
    configs = [_flat(_config(folder)) for folder in (first, second)]
    differ = [
        [key, configs[0].get(key), configs[1].get(key)]
        for key in sorted(set(configs[0]) | set(configs[1]))
        if key != "out" and configs[0].get(key) != configs[1].get(key)
    ]
    return {"runs": [first.name, second.name], "figures": rows, "config_differences": differ}


def read_metrics(folder: Path, start: int = 0) -> tuple[list[dict], int]:
    """metrics.jsonl's complete lines from line `start` on, and the number of the next line (a line
    still being written, without its newline, waits for the next read)."""
    path = RunFolder(folder).metrics
    if not path.is_file():
        return [], start
    records, number = [], 0
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            if number >= start:
                try:
                    records.append(json.loads(raw))
                except json.JSONDecodeError:
                    records.append({})
            number += 1
    return records, max(number, start)


def stop_run(folder: Path) -> int:
    """SIGTERM to the process training the run: it finishes its step and writes a checkpoint."""
    pid = lock_holder(folder)
    if pid is None:
        raise ProcessLookupError(f"{folder.name} is not running")
    os.kill(pid, signal.SIGTERM)
    return pid


def train_command(config: Path, folder: Path, resume: bool = False, processes: int = 1) -> list[str]:
    """`lorafit train CONFIG --out FOLDER` for this interpreter, resuming or in N processes."""
    command = [sys.executable, "-m", "lorafit.cli", "train", str(config), "--out", str(folder)]
    if processes > 1:
        command += ["--launcher", "accelerate", "--num-processes", str(processes)]
    return command + (["--resume"] if resume else [])


def start_detached(command: list[str], log: Path) -> int:
    """Run `command` in a session of its own (it outlives the page's server), output appended to `log`."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return process.pid


def resume_run(folder: Path) -> int:
    """Continue a stopped run in a process of its own (its output in RUN/ui-launch.log)."""
    view = describe_run(folder)
    if view.status == "running":
        raise RuntimeError(f"{folder.name} is running already")
    if view.status == "finished":
        raise RuntimeError(f"{folder.name} has finished")
    return start_detached(train_command(folder / "config.yaml", folder, resume=True), folder / LAUNCH_LOG)


def _json(path: Path) -> dict | None:
    try:
        return read_json_file(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - a file being rewritten: shown as missing until the next read
        return None


def _config(folder: Path) -> dict | None:
    import yaml

    try:
        return yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _last_step(path: Path) -> int:
    if not path.is_file():
        return 0
    last = 0
    for line in path.read_text(encoding="utf-8").splitlines()[-50:]:
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue
    return last

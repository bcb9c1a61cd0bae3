"""What a run leaves on disk, typed: the run folder's layout (`RunFolder`), its `summary.json`
(`RunSummary`) and the `lorafit.json` beside every adapter or model lorafit saves (`AdapterRecord`).

Train writes these; eval, merge, export and chat read them — through these classes only, so a
key is spelled in one place. The JSON keys are a contract (users' scripts read them): a field's
name is its key, and a file from an older lorafit, with keys missing, still reads (as None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit import __version__
from lorafit.integrity import read_json_file

# Every entry a run writes into its folder (README: "A run folder holds"); `lorafit.outputs`
# replaces exactly these on --overwrite, and nothing else a user keeps there.
REPORT_FILES = ("report.json", "report.md", "report.html")  # what `lorafit eval` and a run write

RUN_ENTRIES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "tasks.json",
    "base_outputs.json",
    *REPORT_FILES,
    "checkpoints",
    "adapter",
    "adapter-init",
    "model",
    "data",
    # train.report_to: what each tracker has received, and the trackers' own local files.
    "trackers.json",
    "tensorboard",
    "wandb",
    "mlruns",
    "ui-launch.log",  # what a run started or resumed from `lorafit ui` printed
)


@dataclass(frozen=True)
class RunFolder:
    """Every path of a run folder (README: "A run folder holds")."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    tasks = property(lambda self: self.root / "tasks.json")
    base_outputs = property(lambda self: self.root / "base_outputs.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    initial_adapter = property(lambda self: self.root / "adapter-init")  # PiSSA/OLoRA's starting point
    model = property(lambda self: self.root / "model")  # train.method: full
    data = property(lambda self: self.root / "data")  # raw documents prepared on the fly
    report = property(lambda self: self.root / "report.html")
    trackers = property(lambda self: self.root / "trackers.json")  # train.report_to's runs and progress

    def report_files(self) -> dict[str, Path]:
        return {name: self.root / name for name in REPORT_FILES}

    def is_run(self) -> bool:
        return self.config.is_file() or self.summary.is_file()

    def finished(self) -> bool:
        return self.summary.is_file()

    def trained(self) -> Path | None:
        """The adapter/ or model/ the run saved, if it has."""
        if (self.adapter / "adapter_config.json").is_file():
            return self.adapter
        if (self.model / "config.json").is_file() and (self.model / "lorafit.json").is_file():
            return self.model
        return None

    def read_summary(self) -> RunSummary | None:
        return RunSummary.from_json(read_json_file(self.summary)) if self.summary.is_file() else None


def _from_json(cls, raw: dict[str, Any]):
    """An instance of dataclass `cls` from its JSON object: missing keys take the field's default,
    unknown keys (a newer lorafit's) are kept in `extra`."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in raw.items() if k in names}
    return cls(**known, extra={k: v for k, v in raw.items() if k not in names})


def _to_json(instance, omit_when_none: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {
        f.name: getattr(instance, f.name)
        for f in dataclasses.fields(instance)
        if f.name != "extra" and not (f.name in omit_when_none and getattr(instance, f.name) is None)
    }
    return {**out, **instance.extra}


@dataclass
class RunSummary:
    """summary.json, in its key order. The general_* keys are there only when general text was
    measured (`eval.general`), `tasks` only with task records (`eval.tasks`)."""

    resumed_from: str | None = None
    base_model: str | None = None
    precision: str | None = None
    device: str | None = None
    steps: int | None = None
    stopped_early: bool | None = None
    best_step: int | None = None
    skipped_steps: int | None = None
    overflow_steps: int | None = None  # fp16 steps the loss scaler skipped (not failures)
    rollbacks: int | None = None
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    processes: int | None = None  # data-parallel processes; a step's blocks = micro_batch_size x grad_accum x this
    gradient_checkpointing: bool | None = None  # as it ran (train.gradient_checkpointing 'auto' resolved)
    startup_seconds: float | None = None  # from the start of the run to its first training step
    valid_loss_before: float | None = None
    valid_loss_after: float | None = None
    valid_ppl_before: float | None = None
    valid_ppl_after: float | None = None
    valid_ppl_change_percent: float | None = None
    train_tokens: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    method: str | None = None  # "lora" or "full"
    trainable_parameters: dict | None = None  # ParameterReport.as_dict(): trainable, total, percent, by_module
    data: dict | None = None  # the data statistics of the packing
    data_problems: list[dict] = field(default_factory=list)
    general_ppl_before: float | None = None
    general_ppl_after: float | None = None
    general_ppl_change_percent: float | None = None
    saved_to: str | None = None
    saved_bytes: int | None = None
    generations: list[dict] = field(default_factory=list)
    tasks: dict | None = None  # task metrics by side: {"base": {...}, "adapter": {...}}
    task_sets: dict | None = None  # the same per eval.tasks file: {"base": {file: {...}}, "adapter": {...}}
    transfer: dict | None = None  # with 2+ eval.tasks files: {"own", "others", "warnings"} (report.json's)
    peak_rss_mb: float | None = None
    wall_seconds: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    OPTIONAL = (
        "general_ppl_before",
        "general_ppl_after",
        "general_ppl_change_percent",
        "tasks",
        "task_sets",
        "transfer",
        "overflow_steps",
        "processes",
        "gradient_checkpointing",
        "startup_seconds",
    )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunSummary:
        return _from_json(cls, raw)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self, self.OPTIONAL)

    def parameter_count(self, key: str) -> float | None:
        """'trainable', 'total' or 'percent' of the parameter report (None when unknown)."""
        return (self.trainable_parameters or {}).get(key)


@dataclass
class BaseModelRecord:
    """lorafit.json's `base_model`: the base as the user named it ('' = the embedded default), its
    name, its local path and a fingerprint of its weights."""

    spec: str | None = None
    name: str | None = None
    path: str | None = None
    weights_fingerprint: str | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> BaseModelRecord:
        return _from_json(cls, raw or {})

    def to_json(self) -> dict[str, Any]:
        return _to_json(self, ("weights_fingerprint",))

    def describe(self) -> str:
        return self.name or self.path or "?"


@dataclass
class AdapterRecord:
    """lorafit.json, beside every adapter or model lorafit saves: who made it, on what base, with
    which tokenizer, chat template, configuration and data, and what it measured. Combined
    adapters add `combined_from`, merged models `merged_from`."""

    lorafit_version: str = __version__
    base_model: BaseModelRecord = field(default_factory=BaseModelRecord)
    config: dict | None = None  # the resolved RunConfig, as JSON
    tokenizer: dict | None = None
    chat_template: dict | None = None  # {"origin", "text"}
    data: dict | None = None
    data_hashes: dict | None = None  # digests of the train and valid token blocks
    metrics: dict | None = None
    combined_from: dict | None = None
    merged_from: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AdapterRecord:
        record = _from_json(cls, raw)
        record.base_model = BaseModelRecord.from_json(raw.get("base_model"))
        return record

    @classmethod
    def read(cls, folder: Path) -> AdapterRecord | None:
        """The lorafit.json in `folder`; None for a folder lorafit did not save (a PEFT folder made elsewhere)."""
        file = Path(folder) / "lorafit.json"
        return cls.from_json(read_json_file(file)) if file.is_file() else None

    def to_json(self) -> dict[str, Any]:
        out = _to_json(self, ("config", "tokenizer", "data", "data_hashes", "metrics", "combined_from", "merged_from"))
        out["base_model"] = self.base_model.to_json()
        return out

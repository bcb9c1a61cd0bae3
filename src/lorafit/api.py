"""The Python API, mirroring the command line (users fine-tune in notebooks, as the tutorials they
come from do): the same steps, option names, defaults, checks and errors. The `lorafit` commands
call these functions; each raises a `lorafit.errors.LorafitError` (with the message the command
prints) on bad input.

    import lorafit
    lorafit.prepare(["docs/"], out="data/prepared")
    run = lorafit.train("configs/demo.yaml", out="runs/demo", overrides={"train.max_steps": 20})
    run.summary["valid_ppl_after"], run.adapter, run.report
    lorafit.evaluate(["runs/demo"], out="reports/demo")
    lorafit.merge("runs/demo", out="merged/demo")
    lorafit.export("runs/demo", out="demo.gguf")
    session = lorafit.AdapterSession({"demo": "runs/demo"})
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lorafit.adapters.export import ExportResult, export_gguf
from lorafit.adapters.merge import MergeResult, merge_adapter
from lorafit.adapters.switch import AdapterSession
from lorafit.config import RunConfig
from lorafit.config_files import build_config, load_config
from lorafit.data.datasets import GENERAL_SAMPLE
from lorafit.errors import UsageError
from lorafit.evaluation.run import EvalRequest, EvalResult, run_evaluation
from lorafit.options import check_options, default_of
from lorafit.training.run import RunResult, run_training

__all__ = ["AdapterSession", "PrepareResult", "evaluate", "export", "merge", "prepare", "train"]

# How the advice in data errors names a setting when `lorafit prepare` was run (config keys otherwise).
PREPARE_SETTINGS = {
    "data.min_chars": "--min-chars",
    "data.text_field": "--text-field",
    "data.near_dup_threshold": "--near-dup-threshold",
    "data.exclude": "--exclude",
    "data.train": "the inputs",
}


@dataclass
class PrepareResult:
    out_dir: Path
    paths: dict[str, Path]  # train, valid, stats
    stats: dict
    problems: list[dict]  # every document left out: where, reason, message


def prepare(
    inputs: list[str | Path] | str | Path,
    out: str | Path,
    *,
    text_field: str = default_of("data.text_field"),
    min_chars: int = default_of("data.min_chars"),
    near_dup_threshold: float = default_of("data.near_dup_threshold"),
    valid_ratio: float = default_of("data.valid_ratio"),
    exclude: list[str | Path] | None = None,
    exclude_ngram: int = default_of("data.exclude_ngram"),
    base: str = default_of("model.base"),
    overwrite: bool = False,
    console: Console | None = None,
    workers: int = default_of("data.workers"),
) -> PrepareResult:
    """`lorafit prepare`: clean, de-duplicate, decontaminate and split raw documents into
    OUT/train.jsonl, OUT/valid.jsonl and OUT/stats.json (token counts by `base`'s tokenizer)."""
    from lorafit.data.prepare import PrepareOptions
    from lorafit.data.prepare_progress import prepare_progress
    from lorafit.data.prepared_folder import prepare_to_folder
    from lorafit.data.readers import find_files
    from lorafit.model.load import load_tokenizer, resolve_base
    from lorafit.outputs import check_output_folder, output_folder

    out = Path(out)
    paths_in = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    check_options(
        {
            "--min-chars": ("data.min_chars", min_chars),
            "--near-dup-threshold": ("data.near_dup_threshold", near_dup_threshold),
            "--valid-ratio": ("data.valid_ratio", valid_ratio),
            "--exclude-ngram": ("data.exclude_ngram", exclude_ngram),
            "--workers": ("data.workers", workers),
        }
    )
    check_output_folder(out, "prepared", overwrite)  # before any work
    options = PrepareOptions(
        text_field=text_field,
        min_chars=min_chars,
        near_dup_threshold=near_dup_threshold,
        valid_ratio=valid_ratio,
        exclude=[str(p) for p in exclude or []],
        exclude_ngram=exclude_ngram,
        workers=workers,
        setting_names=PREPARE_SETTINGS,
    )
    console = console or Console()
    input_bytes = sum(path.stat().st_size for path in find_files(paths_in))
    tokenizer = load_tokenizer(resolve_base(base))
    with output_folder(out, "prepared", "lorafit prepare"), prepare_progress(console, input_bytes) as report:
        prepared = prepare_to_folder([str(p) for p in paths_in], options, out, tokenizer, report)
    return PrepareResult(out_dir=out, paths=prepared.paths, stats=prepared.stats, problems=prepared.problems.records())


def train(
    config: RunConfig | dict | str | Path,
    out: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
    ignore_changes: bool = False,
    console: Console | None = None,
) -> RunResult:
    """`lorafit train`: `config` is a YAML path, a dict of the YAML's content or a RunConfig;
    `overrides` are --set's, as {"train.lr": 1e-4} or ["train.lr=1e-4"]; `resume` True (or
    'latest') continues from the newest checkpoint, a path from that checkpoint. Returns the run:
    `.summary` (summary.json), `.adapter` (adapter/ or model/) and `.report` (report.html)."""
    run_config = _run_config(config, overrides)
    resume_from = "latest" if resume is True else None if resume in (None, False) else str(resume)
    return run_training(
        run_config,
        Path(out) if out is not None else None,
        overwrite=overwrite,
        console=console or Console(),
        resume=resume_from,
        ignore_changes=ignore_changes,
    )


def _run_config(config: RunConfig | dict | str | Path, overrides: dict[str, Any] | list[str] | None) -> RunConfig:
    from lorafit.config_files import apply_overrides

    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json")
    if not isinstance(config, dict):
        raise UsageError(f"config: give a YAML path, a dict or a RunConfig, not {type(config).__name__}.")
    raw = apply_overrides(copy.deepcopy(config), overrides or [])
    return build_config(raw, "config", Path.cwd())


def evaluate(
    adapters: list[str | Path] | str | Path = (),
    out: str | Path = "reports/latest",
    *,
    base: str | None = None,
    domain: list[str | Path] | None = None,
    general: list[str | Path] | None = None,
    no_general: bool = False,
    tasks: list[str | Path] | None = None,
    prompts: list[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = default_of("options.eval_batch_size"),
    generate_batch_size: int = default_of("eval.batch_size"),
    max_blocks: int = default_of("options.max_blocks"),
    task_max_examples: int = default_of("eval.task_max_examples"),
    max_new_tokens: int = default_of("eval.max_new_tokens"),
    task_max_new_tokens: int = default_of("eval.task_max_new_tokens"),
    precision: str | None = None,
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> EvalResult:
    """`lorafit eval`: the base and every adapter ([NAME=]PATH: a run folder, its adapter/ or
    model/, or a PEFT folder) on the same data, in one report (report.json/md/html, tasks.json)."""
    check_options(
        {
            "--precision": ("train.precision", precision),
            "--seq-len": ("train.seq_len", seq_len),
            "--batch-size": ("options.eval_batch_size", batch_size),
            "--generate-batch-size": ("eval.batch_size", generate_batch_size),
            "--max-blocks": ("options.max_blocks", max_blocks),
            "--task-max-examples": ("eval.task_max_examples", task_max_examples),
            "--max-new-tokens": ("eval.max_new_tokens", max_new_tokens),
            "--task-max-new-tokens": ("eval.task_max_new_tokens", task_max_new_tokens),
        }
    )
    specs = [str(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not specs and base is None:
        raise UsageError("Name at least one --adapter (or --base alone to evaluate a base model).")
    request = EvalRequest(
        out=Path(out),
        adapters=specs,
        base=base,
        domain=[str(p) for p in domain or []],
        general=[] if no_general else [str(p) for p in general or [GENERAL_SAMPLE]],
        tasks=[str(p) for p in tasks or []],
        prompts=list(prompts or []),
        seq_len=seq_len,
        batch_size=batch_size,
        generate_batch_size=generate_batch_size,
        max_blocks=max_blocks,
        task_max_examples=task_max_examples,
        max_new_tokens=max_new_tokens,
        task_max_new_tokens=task_max_new_tokens,
        precision=precision,
        allow_base_mismatch=allow_base_mismatch,
        overwrite=overwrite,
    )
    return run_evaluation(request, console or Console())


def merge(
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    base: str | None = None,
    max_shard_mb: int = default_of("options.max_shard_mb"),
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> MergeResult:
    """`lorafit merge`: the adapter merged into its base, a plain transformers model folder."""
    check_options({"--max-shard-mb": ("options.max_shard_mb", max_shard_mb)})
    return merge_adapter(
        str(adapter),
        Path(out),
        dtype=dtype,
        base=base,
        allow_base_mismatch=allow_base_mismatch,
        overwrite=overwrite,
        max_shard_bytes=max_shard_mb * 1024**2,
    )


def export(
    adapter: str | Path,
    out: str | Path,
    *,
    format: str = "gguf",  # noqa: A002 (the option's name)
    type: str = "f16",  # noqa: A002 (the option's name)
    base: str | None = None,
    verify: bool = True,
    pre_tokenizer: str | None = None,
    allow_base_mismatch: bool = False,
    adapter_only: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """`lorafit export`: one GGUF file (merged, or with adapter_only the llama.cpp LoRA alone) and
    a Modelfile, checked in llama.cpp against transformers when `verify`."""
    if format != "gguf":
        raise UsageError(f"--format {format}: lorafit exports gguf (for safetensors, use lorafit merge).")
    return export_gguf(
        str(adapter),
        Path(out),
        type,
        base,
        verify,
        pre_tokenizer=pre_tokenizer,
        allow_base_mismatch=allow_base_mismatch,
        adapter_only=adapter_only,
        overwrite=overwrite,
    )

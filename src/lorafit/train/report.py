"""The report `lorafit train` writes at the end of a run, from what the run measured: the base
before training and the trained model after, on the run's validation data (the domain), the
general text of `eval.general`, and the task records of `eval.tasks`."""

from __future__ import annotations

from pathlib import Path

from lorafit.compute.perplexity import LossResult
from lorafit.config import RunConfig
from lorafit.data.pack import PackedBlocks
from lorafit.evaluate.report import (
    ModelEvaluation,
    blocks_info,
    build_report,
    general_files,
    read_curves,
    training_cost,
    write_report,
)


def write_run_report(
    out_dir: Path,
    config: RunConfig,
    summary: dict,
    measured: dict[str, LossResult | None],
    outputs: dict[str, dict | None],
    blocks: dict[str, PackedBlocks | None],
    task_records: int,
    prompts: list[str],
    base: dict,
) -> dict[str, Path]:
    """`measured`: valid_before/after, general_before/after; `outputs`: base and tuned model_outputs();
    `blocks`: the valid and general blocks measured."""
    base_outputs = outputs["base"] or {}
    tuned_outputs = outputs["tuned"] or {}
    method = summary["method"]
    models = [
        ModelEvaluation(
            name="base",
            kind="base",
            path=base.get("path"),
            domain=measured["valid_before"],
            general=measured["general_before"],
            tasks=(base_outputs.get("tasks") or {}).get("metrics", {}),
            generations=base_outputs.get("generations", []),
            cost={"total_parameters": summary["trainable_parameters"]["total"]},
        ),
        ModelEvaluation(
            name="adapter" if method == "lora" else "full fine-tune",
            kind=method,
            path=summary.get("saved_to"),
            domain=measured["valid_after"],
            general=measured["general_after"],
            tasks=(tuned_outputs.get("tasks") or {}).get("metrics", {}),
            generations=tuned_outputs.get("generations", []),
            cost=training_cost(summary),
            curves=read_curves(out_dir / "metrics.jsonl"),
        ),
    ]
    seq_len = config.train.seq_len
    valid_files = list(config.data.valid) or [f"validation split of {', '.join(config.data.train)}"]
    report = build_report(
        models,
        base_model=base,
        data={
            "domain": blocks_info(blocks["valid"], valid_files, seq_len),
            "general": blocks_info(blocks["general"], general_files(config.eval.general), seq_len),
            "tasks": {"files": list(config.eval.tasks), "records": task_records} if task_records else None,
        },
        prompts=prompts,
    )
    report["settings"] = {"precision": summary["precision"], "device": summary["device"], "run": str(out_dir)}
    return write_report(out_dir, report)

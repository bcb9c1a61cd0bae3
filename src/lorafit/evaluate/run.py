"""`lorafit eval`: the base model and any number of adapters, measured on the same data, one report.

The base is loaded once; LoRA adapters are attached to it side by side (PEFT named adapters) and
switched, so N adapters cost one model load. Fully fine-tuned models are loaded on their own.
Every model sees the same blocks, the same prompts and the same task records.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lorafit.adapters.load import (
    TrainedModel,
    adapter_parameters,
    attach_adapter,
    locate_trained,
    resolve_trained_base,
)
from lorafit.adapters.save import folder_bytes
from lorafit.compute.generate import default_prompt
from lorafit.compute.objective import CausalLMObjective
from lorafit.compute.perplexity import evaluate_loss
from lorafit.compute.precision import autocast_context, resolve_precision
from lorafit.config import DataSection, EvalSection, RunConfig
from lorafit.data.chat_template import render_prompt, resolve_chat_template
from lorafit.data.datasets import GENERAL_SAMPLE, load_eval_blocks, load_run_documents, pack_run_documents
from lorafit.data.documents import Problems, print_problems
from lorafit.data.pack import PackedBlocks
from lorafit.errors import DataError, UsageError
from lorafit.evaluate.compare import model_outputs
from lorafit.evaluate.report import (
    ModelEvaluation,
    blocks_info,
    build_report,
    general_files,
    read_curves,
    training_cost,
    write_report,
)
from lorafit.evaluate.tasks import load_task_records
from lorafit.io import write_json_atomic
from lorafit.model.attention import use_block_causal_attention
from lorafit.model.load import check_seq_len, load_causal_lm, load_model_config, load_tokenizer, resolve_base
from lorafit.outputs import check_output_folder, output_folder

GENERATION_PROMPTS = 3  # sampled from the task records when no prompts are given


@dataclass
class EvalRequest:
    """What `lorafit eval` was asked; empty fields fall back to what the adapters' runs recorded."""

    out: Path
    adapters: list[str] = field(default_factory=list)  # PATH or NAME=PATH
    base: str | None = None  # None: the base the first adapter records
    domain: list[str] = field(default_factory=list)  # empty: the first run's validation data
    general: list[str] = field(default_factory=lambda: [GENERAL_SAMPLE])
    tasks: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seq_len: int | None = None
    batch_size: int = 8
    max_blocks: int = 0
    task_max_examples: int = 0
    max_new_tokens: int = 48
    task_max_new_tokens: int = 128
    precision: str | None = None  # None: the run's train.precision ('auto' without a run)
    allow_base_mismatch: bool = False
    seed: int = 0
    overwrite: bool = False  # replace a report lorafit wrote into `out` before


@dataclass
class EvalResult:
    report: dict
    paths: dict[str, Path]


def _run_config(trained: list[TrainedModel]) -> RunConfig | None:
    """The first adapter's recorded run configuration (data fields, template, sequence length)."""
    for model in trained:
        raw = model.metadata.get("config")
        if raw:
            try:
                return RunConfig.model_validate(raw)
            except ValueError:
                continue  # a lorafit.json from another version: fall back to defaults
    return None


def _check_names(trained: list[TrainedModel]) -> None:
    seen = {"base"}
    for model in trained:
        if model.name in seen:
            raise UsageError(
                f"Two models are named '{model.name}' ('base' is the base model's); name them with --adapter NAME=PATH."
            )
        seen.add(model.name)


def _domain_blocks(
    request: EvalRequest, config: RunConfig | None, data: DataSection, tokenizer, seq_len: int, template, problems
) -> tuple[PackedBlocks, list[str]]:
    if request.domain:
        return load_eval_blocks(request.domain, data, tokenizer, seq_len, template, problems), list(request.domain)
    if config is None:
        raise UsageError("Pass --domain FILE: no adapter records a training run whose validation data could be used.")
    try:
        documents = load_run_documents(config.data, None)
    except (DataError, OSError) as exc:
        raise DataError(f"The run's validation data cannot be read again ({exc}); pass --domain FILE.") from None
    blocks = pack_run_documents(documents, tokenizer, seq_len, template, config.data.train_turns)
    files = list(config.data.valid) or [f"validation split of {', '.join(config.data.train)}"]
    return blocks.valid, files


def _prompts(
    request: EvalRequest, records: list, domain: PackedBlocks, tokenizer, template, chat: bool
) -> tuple[list[str], list[str]]:
    """(shown, fed) generation prompts: given ones, else a seeded sample of task prompts, else the
    opening of the first domain block."""
    if request.prompts:
        if chat and template is not None:
            fed = [render_prompt(tokenizer, template, [{"role": "user", "content": p}]) for p in request.prompts]
            return list(request.prompts), fed
        return list(request.prompts), list(request.prompts)
    open_records = [r for r in records if r.choices is None]
    if open_records and template is not None:
        picked = random.Random(request.seed).sample(open_records, min(GENERATION_PROMPTS, len(open_records)))
        chats = [r.messages[:-1] for r in picked]
        return [m[-1]["content"] for m in chats], [render_prompt(tokenizer, template, m) for m in chats]
    opening = default_prompt(tokenizer.decode(domain.input_ids[0][:96], skip_special_tokens=True))
    return [opening], [opening]


def _training_cost(model: TrainedModel) -> dict:
    """The run's cost; an adapter without its run still has a size and a parameter count."""
    cost = training_cost(model.summary)
    if cost["trainable_parameters"] is None and model.kind == "lora":
        cost["trainable_parameters"] = adapter_parameters(model.path)
    cost["saved_bytes"] = cost["saved_bytes"] or folder_bytes(model.path)
    return cost


def run_evaluation(request: EvalRequest, console: Console | None = None) -> EvalResult:
    """Measure the base and every adapter; write report.json/md/html and tasks.json to request.out."""
    console = console or Console()
    out = Path(request.out)
    check_output_folder(out, "report", request.overwrite)  # before anything is measured
    with output_folder(out, "report", "lorafit eval"):
        return _evaluate(request, out, console)


def _evaluate(request: EvalRequest, out: Path, console: Console) -> EvalResult:
    random.seed(request.seed)
    torch.manual_seed(request.seed)
    trained = [locate_trained(spec) for spec in request.adapters]
    _check_names(trained)
    ref, fingerprint = resolve_trained_base(trained, request.base, request.allow_base_mismatch)

    config = _run_config(trained)
    data = config.data if config else DataSection()
    seq_len = request.seq_len or (config.train.seq_len if config else 512)
    check_seq_len(seq_len, load_model_config(ref), "--seq-len")
    tokenizer = load_tokenizer(ref)
    recorded = [m.chat_template for m in trained if m.chat_template is not None]
    template = recorded[0] if recorded else resolve_chat_template(tokenizer, data.chat_template)
    problems = Problems()

    domain, domain_files = _domain_blocks(request, config, data, tokenizer, seq_len, template, problems)
    domain = domain.head(request.max_blocks)
    general = (
        load_eval_blocks(request.general, data, tokenizer, seq_len, template, problems).head(request.max_blocks)
        if request.general
        else None
    )
    records = load_task_records(request.tasks, data, problems) if request.tasks else []
    if request.task_max_examples:
        records = records[: request.task_max_examples]
    if request.tasks and not records:
        raise DataError(f"No usable task records in {', '.join(request.tasks)}; check --tasks.")
    print_problems(console, problems.items, "report.json")
    instruction_run = bool(
        config and (config.eval.tasks or any(m.metadata.get("data", {}).get("instructions") for m in trained))
    )
    shown, fed = _prompts(request, records, domain, tokenizer, template, chat=bool(records) or instruction_run)
    evaluation = EvalSection(
        max_new_tokens=request.max_new_tokens,
        task_max_new_tokens=request.task_max_new_tokens,
        batch_size=max(request.batch_size, 1),
        general=[],
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(request.precision or (config.train.precision if config else "auto"), device)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def autocast():
        return autocast_context(precision, device)

    warmed_up = False

    def measure(model, name: str, kind: str, path: str | None, cost: dict) -> tuple[ModelEvaluation, dict]:
        nonlocal warmed_up
        model.requires_grad_(False)
        objective = CausalLMObjective(model, compute_dtype)
        if not warmed_up:  # one-time kernel set-up would be charged to the first model's speed
            evaluate_loss(objective, domain.head(1), 1, device, autocast)
            warmed_up = True
        console.print(f"measuring [bold]{name}[/]: perplexity on {len(domain)} domain blocks...")
        started = time.perf_counter()
        domain_result = evaluate_loss(objective, domain, request.batch_size, device, autocast)
        seconds = time.perf_counter() - started
        general_result = (
            evaluate_loss(objective, general, request.batch_size, device, autocast) if general is not None else None
        )
        if records:
            console.print(f"measuring [bold]{name}[/]: {len(records)} task records...")
        outputs = model_outputs(model, tokenizer, template, fed, records, evaluation, device, autocast)
        cost = {**cost, "eval_seconds": seconds, "eval_tokens_per_second": domain_result.tokens / max(seconds, 1e-9)}
        return ModelEvaluation(
            name=name,
            kind=kind,
            path=path,
            domain=domain_result,
            general=general_result,
            tasks=outputs.get("tasks", {}).get("metrics", {}),
            generations=outputs["generations"],
            cost=cost,
        ), outputs

    console.print(f"[bold]base[/] {ref.name}  [bold]precision[/] {precision}  [bold]device[/] {device}")

    def load_model(model_ref):
        loaded = load_causal_lm(model_ref, compute_dtype).to(device)
        if device.type == "cpu" and precision == "bf16":
            use_block_causal_attention(loaded)
        return loaded

    model = load_model(ref)
    total_parameters = sum(p.numel() for p in model.parameters())
    results: dict[str, tuple[ModelEvaluation, dict]] = {
        "base": measure(model, "base", "base", ref.path, {"total_parameters": total_parameters})
    }
    peft_model = None
    for item in (m for m in trained if m.kind == "lora"):
        peft_model = attach_adapter(peft_model or model, item.path, item.name)
        peft_model.set_adapter(item.name)
        results[item.name] = measure(peft_model, item.name, "lora", str(item.path), _training_cost(item))
    del peft_model, model
    for item in (m for m in trained if m.kind == "full"):
        full = load_model(resolve_base(str(item.path)))
        results[item.name] = measure(full, item.name, "full", str(item.path), _training_cost(item))
        del full

    ordered = [results["base"]] + [results[m.name] for m in trained]
    models = [evaluation for evaluation, _ in ordered]
    for evaluation, item in zip(models[1:], trained):
        evaluation.curves = read_curves(item.run_dir / "metrics.jsonl") if item.run_dir else None
        evaluation.cost["total_parameters"] = evaluation.cost.get("total_parameters") or total_parameters
    report = build_report(
        models,
        base_model={"name": ref.name, "path": ref.path, "weights_fingerprint": fingerprint},
        data={
            "domain": blocks_info(domain, domain_files, seq_len),
            "general": blocks_info(general, general_files(request.general), seq_len),
            "tasks": {"files": list(request.tasks), "records": len(records)} if records else None,
        },
        prompts=shown,
    )
    report["settings"] = {"precision": precision, "device": str(device), "batch_size": request.batch_size}
    # Every record or file left out, with where and why (the terminal shows the first of them).
    report["data"]["skipped"] = problems.records()
    paths = write_report(out, report)
    if records:
        paths["tasks.json"] = out / "tasks.json"
        answers = task_answers(records, [m.name for m in models], ordered)
        answers["skipped"] = [{"where": p.where, "message": p.message} for p in problems.items]
        write_json_atomic(paths["tasks.json"], answers)
    else:
        (out / "tasks.json").unlink(missing_ok=True)  # an earlier report's (this folder is lorafit's report)
    return EvalResult(report=report, paths=paths)


def task_answers(records: list, names: list[str], ordered: list[tuple[ModelEvaluation, dict]]) -> dict:
    """tasks.json: every model's metrics and, per record, every model's answer side by side."""
    open_records = [r for r in records if r.choices is None]
    mc_records = [r for r in records if r.choices is not None]
    sides = [outputs.get("tasks", {}) for _, outputs in ordered]
    rows = [
        {
            "source": record.source,
            "prompt": record.messages[-2]["content"],
            "reference": record.messages[-1]["content"],
            "answers": dict(zip(names, (side["answers"][i] for side in sides))),
        }
        for i, record in enumerate(open_records)
    ]
    rows += [
        {
            "source": record.source,
            "prompt": record.messages[-1]["content"],
            "reference": record.choices[record.answer],
            "answers": dict(zip(names, (record.choices[side["picks"][i]] for side in sides))),
        }
        for i, record in enumerate(mc_records)
    ]
    return {"metrics": {name: evaluation.tasks for name, (evaluation, _) in zip(names, ordered)}, "answers": rows}

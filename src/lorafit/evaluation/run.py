"""`lorafit eval`: the base model and any number of adapters, measured on the same data, one report.

The base is loaded once; LoRA adapters are attached to it side by side (PEFT named adapters) and
switched, so N adapters cost one model load. Fully fine-tuned models are loaded on their own.
Every model sees the same blocks, the same prompts and the same task records.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lorafit.adapters.load import (
    TrainedLocation,
    adapter_parameters,
    attach_adapter,
    locate_trained,
    resolve_trained_base,
)
from lorafit.adapters.save import folder_bytes
from lorafit.artifacts import RunFolder
from lorafit.compute.objective import CausalLMObjective
from lorafit.compute.perplexity import evaluate_loss
from lorafit.config import DataSection, RunConfig
from lorafit.data.chat_template import resolve_chat_template
from lorafit.data.datasets import (
    GENERAL_SAMPLE,
    load_eval_blocks,
    load_run_documents,
    pack_run_documents,
    validation_files,
)
from lorafit.data.documents import Problems, print_problems
from lorafit.data.pack import PackedBlocks
from lorafit.errors import DataError, UsageError
from lorafit.evaluation.core import (
    EvalInputs,
    MeasuredModel,
    choose_prompts,
    evaluation_report,
    measure_model,
    task_answer_rows,
)
from lorafit.evaluation.report import read_curves, training_cost, write_report
from lorafit.evaluation.tasks import flat_records, load_task_sets
from lorafit.io import write_json_atomic
from lorafit.model.attention import use_block_causal_attention
from lorafit.model.device import autocast_context, compute_dtype, default_device, resolve_precision
from lorafit.model.load import check_seq_len, load_causal_lm, load_tokenizer, resolve_base
from lorafit.options import default_of
from lorafit.outputs import check_output_folder, output_folder


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
    batch_size: int = default_of("options.eval_batch_size")
    generate_batch_size: int = default_of("eval.batch_size")
    max_blocks: int = default_of("options.max_blocks")
    task_max_examples: int = default_of("eval.task_max_examples")
    max_new_tokens: int = default_of("eval.max_new_tokens")
    task_max_new_tokens: int = default_of("eval.task_max_new_tokens")
    precision: str | None = None  # None: the run's train.precision ('auto' without a run)
    allow_base_mismatch: bool = False
    seed: int = 0
    overwrite: bool = False  # replace a report lorafit wrote into `out` before


@dataclass
class EvalResult:
    report: dict
    paths: dict[str, Path]


def _run_config(trained: list[TrainedLocation]) -> RunConfig | None:
    """The first adapter's recorded run configuration (data fields, template, sequence length)."""
    for model in trained:
        raw = model.record.config
        if raw:
            try:
                return RunConfig.model_validate(raw)
            except ValueError:
                continue  # a lorafit.json from another version: fall back to defaults
    return None


def _check_names(trained: list[TrainedLocation]) -> None:
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
    return blocks.valid, validation_files(config.data)


def _prompts(
    request: EvalRequest, records: list, domain: PackedBlocks, tokenizer, template, chat: bool
) -> tuple[list[str], list[str]]:
    """(shown, fed) generation prompts: given ones, else a seeded sample of task prompts, else the
    opening of the first domain block."""
    open_records = [r.messages for r in records if r.choices is None]
    return choose_prompts(
        request.prompts,
        tokenizer,
        template if chat or open_records else None,
        open_records,
        tokenizer.decode(domain.input_ids[0][:96], skip_special_tokens=True),
        sample_seed=request.seed,
    )


def _training_cost(model: TrainedLocation) -> dict:
    """The run's cost; an adapter without its run still has a size and a parameter count."""
    cost = training_cost(model.run_summary())
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
    seq_len = request.seq_len or (config.train.seq_len if config else 512)
    check_seq_len(seq_len, ref, "--seq-len")
    problems = Problems()
    inputs, domain_files = _eval_inputs(request, config, trained, ref, seq_len, problems)
    print_problems(console, problems.items, "report.json")
    precision = resolve_precision(request.precision or (config.train.precision if config else "auto"), inputs.device)
    inputs.autocast = functools.partial(autocast_context, precision, inputs.device)
    console.print(f"[bold]base[/] {ref.name}  [bold]precision[/] {precision}  [bold]device[/] {inputs.device}")

    measured = _measure_all(trained, ref, inputs, precision, console)
    report = evaluation_report(
        measured,
        inputs,
        base_model={"name": ref.name, "path": ref.path, "weights_fingerprint": fingerprint},
        domain_files=domain_files,
        general_paths=request.general,
        seq_len=seq_len,
    )
    report["settings"] = {
        "precision": precision,
        "device": str(inputs.device),
        "batch_size": request.batch_size,
        "generate_batch_size": request.generate_batch_size,
    }
    # Every record or file left out, with where and why (the terminal shows the first of them).
    report["data"]["skipped"] = problems.records()
    paths = write_report(out, report)
    if inputs.records:
        paths["tasks.json"] = out / "tasks.json"
        sides = {m.evaluation.name: m.outputs for m in measured}
        answers = {
            "metrics": {m.evaluation.name: m.evaluation.tasks for m in measured},
            "sets": {m.evaluation.name: m.evaluation.task_sets for m in measured},
            "answers": task_answer_rows(inputs.records, sides),
            "skipped": problems.records(),
        }
        write_json_atomic(paths["tasks.json"], answers)
    else:
        (out / "tasks.json").unlink(missing_ok=True)  # an earlier report's (this folder is lorafit's report)
    return EvalResult(report=report, paths=paths)


def _eval_inputs(
    request: EvalRequest, config: RunConfig | None, trained: list[TrainedLocation], ref, seq_len: int, problems
) -> tuple[EvalInputs, list[str]]:
    """The blocks, records and prompts every model is measured on, and the domain's files."""
    data = config.data if config else DataSection()
    tokenizer = load_tokenizer(ref)
    recorded = [m.chat_template for m in trained if m.chat_template is not None]
    template = recorded[0] if recorded else resolve_chat_template(tokenizer, data.chat_template)
    domain, domain_files = _domain_blocks(request, config, data, tokenizer, seq_len, template, problems)
    domain = domain.head(request.max_blocks)
    general = (
        load_eval_blocks(request.general, data, tokenizer, seq_len, template, problems).head(request.max_blocks)
        if request.general
        else None
    )
    task_sets = load_task_sets(request.tasks, data, problems, request.task_max_examples, "--tasks")
    records = flat_records(task_sets)
    trained_on_instructions = any((m.record.data or {}).get("instructions") for m in trained)
    instruction_run = bool(config and (config.eval.tasks or trained_on_instructions))
    shown, fed = _prompts(request, records, domain, tokenizer, template, chat=bool(records) or instruction_run)
    inputs = EvalInputs(
        tokenizer=tokenizer,
        template=template,
        domain=domain,
        general=general,
        task_sets=task_sets,
        shown_prompts=shown,
        fed_prompts=fed,
        device=default_device(),
        batch_size=max(request.batch_size, 1),
        generate_batch_size=max(request.generate_batch_size, 1),
        max_new_tokens=request.max_new_tokens,
        task_max_new_tokens=request.task_max_new_tokens,
    )
    return inputs, domain_files


def _measure_all(
    trained: list[TrainedLocation], ref, inputs: EvalInputs, precision: str, console: Console
) -> list[MeasuredModel]:
    """The base, then every adapter switched on one loaded base, then every full model loaded on
    its own; returned in the order the adapters were named, the base first."""
    dtype = compute_dtype(precision)

    def load_model(model_ref):
        loaded = load_causal_lm(model_ref, dtype).to(inputs.device)
        if inputs.device.type == "cpu" and precision == "bf16":
            use_block_causal_attention(loaded)
        return loaded

    def measure(model, name: str, kind: str, path: str | None, cost: dict) -> MeasuredModel:
        model.requires_grad_(False)
        objective = CausalLMObjective(model, dtype)
        return measure_model(model, objective, name, kind, path, inputs, cost, console)

    model = load_model(ref)
    # One-time kernel set-up would otherwise be charged to the first model's speed.
    evaluate_loss(CausalLMObjective(model, dtype), inputs.domain.head(1), 1, inputs.device, inputs.autocast)
    total_parameters = sum(p.numel() for p in model.parameters())
    results = {"base": measure(model, "base", "base", ref.path, {"total_parameters": total_parameters})}
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
    for item in trained:
        evaluation = results[item.name].evaluation
        evaluation.curves = read_curves(RunFolder(item.run_dir).metrics) if item.run_dir else None
        evaluation.cost["total_parameters"] = evaluation.cost.get("total_parameters") or total_parameters
    return [results["base"]] + [results[m.name] for m in trained]

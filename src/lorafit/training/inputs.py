"""What a training run reads before it loads the model: the base's tokenizer, the documents and
instruction examples packed into blocks, the chat template, the task records and general text it
is measured on, and the prompts it answers side by side — every input checked before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.markup import escape

from lorafit.artifacts import RunFolder
from lorafit.compute.batches import BlockTensors
from lorafit.config import RunConfig
from lorafit.data.chat_template import ChatTemplate, resolve_chat_template
from lorafit.data.datasets import (
    RunBlocks,
    RunDocuments,
    load_eval_blocks,
    load_run_documents,
    mix_conversations,
    pack_run_documents,
)
from lorafit.data.documents import Problems, print_problems
from lorafit.errors import DataError
from lorafit.evaluation.core import EvalInputs, choose_prompts
from lorafit.evaluation.tasks import load_task_sets
from lorafit.model.load import (
    BaseModelRef,
    check_seq_len,
    load_tokenizer,
    resolve_base,
    weights_fingerprint,
)
from lorafit.model.quantize import check_quantization
from lorafit.training.base_answers import BaseAnswerer
from lorafit.training.replay import no_usable_replay, replay_conversations
from lorafit.training.self_distill import self_distill


@dataclass
class RunInputs:
    ref: BaseModelRef
    tokenizer: object
    template: ChatTemplate | None  # instruction data and task records render through it
    documents: RunDocuments
    blocks: RunBlocks
    train_tensor: BlockTensors
    evaluation: EvalInputs  # domain: every validation block; general: capped at train.eval_max_blocks
    task_problems: Problems
    eval_max_blocks: int = 0  # train.eval_max_blocks (0: all)

    @property
    def capped_valid(self):
        """The validation blocks of the periodic validations (train.eval_max_blocks)."""
        return self.evaluation.domain.head(self.eval_max_blocks)

    def batch_sources(self, block_ids: list[int]) -> str:
        """The files behind the given training blocks (the first five), for a diagnosis."""
        docs = sorted({member for block in block_ids for member in self.blocks.train.members[block]})
        return ", ".join(self.blocks.sources[i] for i in docs[:5]) + (" ..." if len(docs) > 5 else "")


def describe_data(stats: dict, formats: dict[str, str]) -> str:
    parts = []
    if stats.get("train_documents"):
        parts.append(
            f"{stats['train_documents']} train / {stats['valid_documents']} valid documents "
            f"({stats['train_tokens']:,} / {stats['valid_tokens']:,} tokens)"
        )
    instructions = stats.get("instructions")
    if instructions:
        kinds = sorted({fmt for fmt in formats.values() if fmt != "text"})
        parts.append(
            f"{instructions['train_examples']} train / {instructions['valid_examples']} valid examples "
            f"({', '.join(kinds)}; {instructions['truncated_examples']} truncated; template: "
            f"{instructions['chat_template']})"
        )
    return "; ".join(parts)


def prepare_run_inputs(
    config: RunConfig,
    folder: RunFolder,
    device: torch.device,
    console: Console,
    precision: str = "fp32",
    base_answers: bool = True,
) -> RunInputs:
    """Everything the run reads, checked. `base_answers`: whether the recipes that have the base
    model answer ('auto' self-distillation and replay) may run here (not under FSDP/ZeRO-3 yet)."""
    train, evaluation = config.train, config.eval
    check_quantization(config.model.quantization, device)  # before any work
    ref = resolve_base(config.model.base, config.model.rope_scaling)
    check_seq_len(train.seq_len, ref)  # before any expensive work
    tokenizer = load_tokenizer(ref)
    documents = load_run_documents(config.data, folder.data, tokenizer)
    # Instruction data and task evaluation render prompts with one template, chosen (and checked) here.
    template = (
        resolve_chat_template(tokenizer, config.data.chat_template)
        if documents.instruction or documents.valid_conversations or evaluation.tasks
        else None
    )
    # 'auto' self-distillation and replay apply to instruction data, where the base may answer.
    automatic = documents.instruction and base_answers
    if documents.instruction and not automatic and "auto" in (config.data.self_distill, config.data.replay_share):
        console.print("self-distillation and replay ('auto') are off while the weights are held in parts")
    answerer = base_answerer(config, documents, automatic, (ref, tokenizer, template), precision, device, console)
    if config.data.self_distills(automatic):
        _distill_answers(documents, answerer, config.data.distill_max_new_tokens, console)
    blocks = pack_run_documents(
        documents, tokenizer, train.seq_len, template, config.data.train_turns, config.data.instruct_share
    )
    replay_share = config.data.replay_share_for(automatic)
    if replay_share:
        blocks = _mix_in_replay(config, documents, blocks, answerer, (tokenizer, template), replay_share, console)
    if answerer is not None:
        answerer.release()
    print_problems(console, documents.problems.items, "summary.json")

    task_problems = Problems()
    task_sets = load_task_sets(evaluation.tasks, config.data, task_problems, evaluation.task_max_examples)
    print_problems(console, task_problems.items, "tasks.json")
    general = (
        load_eval_blocks(evaluation.general, config.data, tokenizer, train.seq_len, template)
        if evaluation.general
        else None
    )
    shown, fed = _side_by_side_prompts(config, documents, tokenizer, template)
    inputs = RunInputs(
        ref=ref,
        tokenizer=tokenizer,
        template=template,
        documents=documents,
        blocks=blocks,
        train_tensor=BlockTensors.from_packed(blocks.train),
        evaluation=EvalInputs(
            tokenizer=tokenizer,
            template=template,
            domain=blocks.valid,
            general=general.head(train.eval_max_blocks) if general is not None else None,
            task_sets=task_sets,
            shown_prompts=shown,
            fed_prompts=fed,
            device=device,
            generate_batch_size=evaluation.batch_size,
            loss_batch_size=train.micro_batch_size,
            max_new_tokens=evaluation.max_new_tokens,
            task_max_new_tokens=evaluation.task_max_new_tokens,
        ),
        task_problems=task_problems,
        eval_max_blocks=train.eval_max_blocks,
    )
    return inputs


def _distill_answers(documents: RunDocuments, answerer: BaseAnswerer, max_new_tokens: int, console: Console) -> None:
    """Self-distillation: the training answers replaced by the base model's (data.self_distill)."""
    documents.train_conversations, distilled = self_distill(documents.train_conversations, answerer, max_new_tokens)
    documents.stats["self_distill"] = distilled
    console.print(
        f"[bold]self-distillation[/] {distilled['rewritten']} of {len(documents.train_conversations)} answers "
        f"rewritten by the base model; kept: " + ", ".join(f"{k} {v}" for k, v in distilled["kept"].items())
    )


def _mix_in_replay(
    config: RunConfig,
    documents: RunDocuments,
    blocks: RunBlocks,
    answerer: BaseAnswerer,
    rendering: tuple,
    share: float,
    console: Console,
) -> RunBlocks:
    """Replay: `share` of the training blocks the base model's answers to general prompts
    (data.replay_share); under 'auto', no usable answer means no replay, said so."""
    data, (tokenizer, template) = config.data, rendering
    replayed, stats = replay_conversations(answerer, data.replay_prompts, data.replay_max_new_tokens)
    if not replayed:
        if data.replay_share != "auto":
            raise DataError(no_usable_replay(stats["prompts"]) + ", or set data.replay_share: 0.")
        console.print(f"[yellow]replay skipped:[/] {escape(no_usable_replay(stats['prompts']))}.")
        return blocks
    blocks, added = mix_conversations(
        blocks, replayed, tokenizer, config.train.seq_len, template, share, documents.problems
    )
    blocks.stats["replay"] = {**stats, "train_blocks": added}
    console.print(
        f"[bold]replay[/] {added} of {len(blocks.train)} training blocks hold the base model's answers to "
        f"{stats['answers']} general prompts"
    )
    return blocks


def base_answerer(
    config: RunConfig,
    documents: RunDocuments,
    automatic: bool,
    model: tuple,
    precision: str,
    device: torch.device,
    console: Console,
) -> BaseAnswerer | None:
    """The base model as the self-distillation and replay recipes use it (None when neither is on);
    both rework instruction data, so one asked for by name on a run without any is refused."""
    data = config.data
    # Asked for by name (not 'auto'), on data that has no instructions to rework: refused.
    asked = (("data.self_distill", data.self_distill is True), ("data.replay_share", data.replay_share_for(False) > 0))
    wanted = [name for name, on in asked if on]
    if not wanted and not data.self_distills(automatic) and not data.replay_share_for(automatic):
        return None
    if wanted and not documents.instruction:
        raise DataError(
            f"{wanted[0]} reworks instruction data, and data.train ({', '.join(data.train)}) holds none; "
            f"turn {wanted[0]} off for continued pretraining."
        )
    ref, tokenizer, template = model
    return BaseAnswerer(
        ref,
        weights_fingerprint(ref),
        tokenizer,
        template,
        precision,
        device,
        config.eval.batch_size,
        report=lambda message: console.print(escape(message)),
    )


def _side_by_side_prompts(
    config: RunConfig, documents: RunDocuments, tokenizer, template: ChatTemplate | None
) -> tuple[list[str], list[str]]:
    """Instruction runs ask questions through the chat template (the given prompts, else the first
    validation conversations); text runs continue the opening of a validation document."""
    asks = template is not None and (documents.instruction or not documents.valid)
    conversations = [c.messages for c in (documents.valid_conversations or documents.train_conversations)]
    opening = documents.valid[0].text if documents.valid else ""
    return choose_prompts(list(config.eval.prompts), tokenizer, template if asks else None, conversations, opening)

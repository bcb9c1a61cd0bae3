"""The data of a training run: text documents (prepared on the fly when raw) and instruction
conversations, loaded by format and packed into training and validation blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.config import DataSection
from lorafit.data.chat_template import ChatTemplate
from lorafit.data.decontaminate import excluded_ngrams, is_contaminated
from lorafit.data.dedup import drop_exact_duplicates_by, drop_near_duplicates
from lorafit.data.documents import Document, Problems, first_of
from lorafit.data.examples import build_examples
from lorafit.data.formats import Conversation, detect_file_format, field_names, read_conversations
from lorafit.data.pack import PackedBlocks, concatenate_blocks, pack_documents, pack_examples
from lorafit.data.prepare import PrepareOptions, load_prepared_jsonl, prepare_documents
from lorafit.data.prepared_folder import prepare_to_folder
from lorafit.data.readers import find_files
from lorafit.data.records import RECORD_SUFFIXES
from lorafit.data.split import split_documents
from lorafit.data.tokenize import pad_token_id, tokenize_cached
from lorafit.errors import DataError


@dataclass
class RunDocuments:
    train: list[Document]
    valid: list[Document]
    train_conversations: list[Conversation] = field(default_factory=list)
    valid_conversations: list[Conversation] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected or configured format

    @property
    def instruction(self) -> bool:
        return bool(self.train_conversations)


def _options(data: DataSection, valid_ratio: float) -> PrepareOptions:
    return PrepareOptions(
        text_field=data.text_field,
        min_chars=data.min_chars,
        near_dup_threshold=data.near_dup_threshold,
        valid_ratio=valid_ratio,
        exclude=list(data.exclude),
        exclude_ngram=data.exclude_ngram,
        workers=data.workers,
    )


def file_format(path: Path, data: DataSection) -> str:
    """'text' for raw documents; for JSONL/JSON the configured format, or the one its records show."""
    if path.suffix.lower() not in RECORD_SUFFIXES:
        return "text"
    if data.format != "auto":
        return data.format
    return detect_file_format(path, field_names(data.fields), data.text_field)


def _group_by_format(paths: list[Path], data: DataSection, formats: dict[str, str]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        fmt = formats.setdefault(str(path), file_format(path, data))
        groups.setdefault(fmt, []).append(path)
    return groups


def _read_text(
    paths: list[Path],
    data: DataSection,
    valid_ratio: float,
    prepared_dir: Path | None,
    problems: Problems,
    tokenizer=None,
):
    """(train, valid, stats): prepared JSONL used as is; raw documents cleaned — streamed into
    `prepared_dir` when given (and tokenized there by the workers into cached token shards)."""
    if all(path.suffix.lower() in RECORD_SUFFIXES for path in paths):
        documents, _ = load_prepared_jsonl(paths, data.text_field, problems)
        train, valid = split_documents(documents, valid_ratio)
        return train, valid, {}
    if prepared_dir is None:
        prepared = prepare_documents(paths, _options(data, valid_ratio))
        problems.items.extend(prepared.problems.items)
        return prepared.train, prepared.valid, prepared.stats
    written = prepare_to_folder([str(p) for p in paths], _options(data, valid_ratio), prepared_dir, tokenizer)
    problems.items.extend(written.problems.items)
    train = load_prepared_jsonl([written.paths["train"]])[0]
    valid = load_prepared_jsonl([written.paths["valid"]])[0]
    return train, valid, written.stats


def _read_instructions(
    groups: dict[str, list[Path]], data: DataSection, problems: Problems, decontaminate: bool = True
) -> tuple[list, dict]:
    """Instruction records of every non-text group, with the cleaning documents get: exact and
    near-duplicates dropped (data.near_dup_threshold, on the messages' text), and — for training
    data — records sharing a long n-gram with data.exclude."""
    fields = field_names(data.fields)
    conversations: list[Conversation] = []
    for fmt, paths in groups.items():
        if fmt != "text":
            conversations.extend(read_conversations(paths, fmt, fields, problems))
    records = len(conversations)
    unique, exact = drop_exact_duplicates_by(conversations, lambda c: repr(c.messages))
    unique, near = drop_near_duplicates(unique, data.near_dup_threshold)
    contaminated = 0
    if decontaminate and data.exclude:
        banned = excluded_ngrams(data.exclude, data.exclude_ngram)
        kept = [c for c in unique if not is_contaminated(c.text, banned, data.exclude_ngram)]
        contaminated, unique = len(unique) - len(kept), kept
    stats = {
        "records_in": records + problems.count("invalid_record"),
        "invalid_records": problems.count("invalid_record"),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "contaminated": contaminated,
    }
    return unique, stats


def load_run_documents(data: DataSection, prepared_dir: Path | None, tokenizer=None) -> RunDocuments:
    """Train/valid documents and conversations for `data`; raw documents are cleaned and written
    to `prepared_dir` (when given; with `tokenizer`, tokenized into cached token shards that
    packing then reads). Files of the same run may mix formats (text and instructions)."""
    problems = Problems()
    formats: dict[str, str] = {}
    valid_ratio = 0.0 if data.valid else data.valid_ratio
    groups = _group_by_format(find_files(data.train), data, formats)
    train: list[Document] = []
    valid: list[Document] = []
    stats: dict = {}
    if "text" in groups:
        train, valid, stats = _read_text(groups["text"], data, valid_ratio, prepared_dir, problems, tokenizer)
    conversations, instruction_stats = _read_instructions(groups, data, problems)
    train_conversations, valid_conversations = split_documents(conversations, valid_ratio)
    if data.valid:
        valid_problems = Problems()
        valid_groups = _group_by_format(find_files(data.valid), data, formats)
        if "text" in valid_groups:
            valid = _read_text(valid_groups["text"], data, 0.0, None, valid_problems)[0]
        valid_conversations = _read_instructions(valid_groups, data, valid_problems)[0]
        problems.items.extend(valid_problems.items)
    if not train and not train_conversations:
        raise DataError(
            f"No training documents or examples in {', '.join(data.train)}{first_problems(problems)}; check "
            "data.train, data.format and data.text_field / data.fields."
        )
    if not valid and not valid_conversations:
        raise DataError(
            "No validation data: set data.valid, or a data.valid_ratio > 0 with at least two training documents."
        )
    if conversations or train_conversations:
        stats["instructions"] = instruction_stats
    return RunDocuments(
        train=train,
        valid=valid,
        train_conversations=train_conversations,
        valid_conversations=valid_conversations,
        stats=stats,
        problems=problems,
        formats=formats,
    )


def validation_files(data: DataSection) -> list[str]:
    """data.valid's files, or what stands for them: the split held out of data.train."""
    return list(data.valid) or [f"validation split of {', '.join(data.train)}"]


def first_problems(problems: Problems, shown: int = 3) -> str:
    """' (N records or files skipped: where: why; ...)' for an error that would otherwise hide why."""
    if not problems.items:
        return ""
    listed = first_of(problems.items, shown)
    more = f"; {len(problems.items) - shown} more" if len(problems.items) > shown else ""
    return f" ({len(problems.items)} records or files skipped: {listed}{more})"


@dataclass
class RunBlocks:
    train: PackedBlocks
    valid: PackedBlocks
    stats: dict
    sources: list[str]  # what a block's `members` index: documents first, then examples


def resample_blocks(blocks: PackedBlocks, count: int, seed: int = 0) -> PackedBlocks:
    """`count` blocks drawn without replacement, cycling through a seeded order when more are wanted."""
    order = np.random.default_rng(seed).permutation(len(blocks))
    picked = np.resize(order, count)
    return PackedBlocks(
        blocks.input_ids[picked],
        None if blocks.labels is None else blocks.labels[picked],
        None if blocks.position_ids is None else blocks.position_ids[picked],
        [blocks.members[i] for i in picked],
    )


def _pack_document_text(documents: list[Document], tokenizer, seq_len: int, keep_tail: bool):
    """Documents tokenized (cached) and cut into EOS-separated blocks; (blocks or None, token ids)."""
    ids = tokenize_cached([d.text for d in documents], tokenizer)
    return (pack_documents(ids, tokenizer.eos_token_id, seq_len, keep_tail=keep_tail) if ids else None), ids


def _pack_text(documents: RunDocuments, tokenizer, seq_len: int, stats: dict):
    if not documents.train and not documents.valid:
        return None, None
    train, train_ids = _pack_document_text(documents.train, tokenizer, seq_len, keep_tail=False)
    valid, valid_ids = _pack_document_text(documents.valid, tokenizer, seq_len, keep_tail=True)
    stats.update(
        train_documents=len(documents.train),
        valid_documents=len(documents.valid),
        train_tokens=int(sum(len(ids) for ids in train_ids)),
        valid_tokens=int(sum(len(ids) for ids in valid_ids)),
    )
    return train, valid


def _pack_conversations(conversations, tokenizer, seq_len: int, template, train_turns: str, problems):
    """Examples with answer-only labels, packed whole; (blocks or None, the examples)."""
    examples = build_examples(conversations, tokenizer, template, seq_len, train_turns, problems)
    if not examples.input_ids:
        return None, examples
    return pack_examples(examples.input_ids, examples.labels, seq_len, pad_token_id(tokenizer)), examples


def _pack_instructions(documents: RunDocuments, tokenizer, seq_len: int, template, train_turns, stats, problems):
    packed_train, train = _pack_conversations(
        documents.train_conversations, tokenizer, seq_len, template, train_turns, problems
    )
    packed_valid, valid = _pack_conversations(
        documents.valid_conversations, tokenizer, seq_len, template, train_turns, problems
    )
    instructions = stats.setdefault("instructions", {})
    instructions.update(
        train_examples=train.stats["examples"],
        valid_examples=valid.stats["examples"],
        truncated_examples=train.stats["truncated_examples"] + valid.stats["truncated_examples"],
        dropped_examples_prompt_too_long=train.stats["dropped_examples_prompt_too_long"]
        + valid.stats["dropped_examples_prompt_too_long"],
        train_tokens=train.stats["tokens"],
        train_answer_tokens=train.stats["answer_tokens"],
        valid_answer_tokens=valid.stats["answer_tokens"],
        chat_template=template.origin,
    )
    if packed_train is not None:
        # Share of block tokens that are real (not padding): best-fit packing keeps this near 1.
        instructions["packing_efficiency"] = round(train.stats["tokens"] / packed_train.input_ids.size, 4)
    return packed_train, packed_valid, train.sources


def pack_run_documents(
    documents: RunDocuments,
    tokenizer,
    seq_len: int,
    template: ChatTemplate | None = None,
    train_turns: str = "all",
    instruct_share: float = 0.0,
    problems: Problems | None = None,
) -> RunBlocks:
    """Tokenize (cached) and pack: text into EOS-separated blocks, instructions into whole-example
    blocks; with both, the training blocks are mixed (`instruct_share` of them instructions)."""
    stats: dict = dict(documents.stats)
    problems = problems if problems is not None else documents.problems
    text_train, text_valid = _pack_text(documents, tokenizer, seq_len, stats)
    sources = [d.source for d in documents.train]
    inst_train = inst_valid = None
    if documents.train_conversations or documents.valid_conversations:
        if template is None:
            raise ValueError("instruction data needs a chat template")
        inst_train, inst_valid, example_sources = _pack_instructions(
            documents, tokenizer, seq_len, template, train_turns, stats, problems
        )
        if text_train is not None and inst_train is not None and instruct_share:
            wanted = max(1, round(instruct_share / (1.0 - instruct_share) * len(text_train)))
            inst_train = resample_blocks(inst_train, wanted)
        if inst_train is not None:
            # Examples are numbered after the documents in `sources`.
            inst_train.members = [[m + len(sources) for m in block] for block in inst_train.members]
        sources = sources + example_sources
    train = _join(text_train, inst_train)
    valid = _join(text_valid, inst_valid)
    if train is None or len(train) == 0:
        raise DataError(
            f"The training data has fewer tokens ({stats.get('train_tokens', 0)}) than one block of "
            f"train.seq_len={seq_len}; add data or lower train.seq_len."
        )
    if valid is None:
        raise DataError("No validation tokens after tokenization; add validation data.")
    stats.update(train_blocks=len(train), valid_blocks=len(valid))
    if inst_train is not None:
        stats["instructions"]["train_blocks"] = len(inst_train)
    return RunBlocks(train=train, valid=valid, stats=stats, sources=sources)


def mix_conversations(
    blocks: RunBlocks,
    conversations: list[Conversation],
    tokenizer,
    seq_len: int,
    template: ChatTemplate,
    share: float,
    problems: Problems,
) -> tuple[RunBlocks, int]:
    """`blocks` with `conversations` packed and mixed into training as `share` of its blocks
    (drawn in a seeded order, cycling when more are wanted); (blocks, blocks added)."""
    packed, examples = _pack_conversations(conversations, tokenizer, seq_len, template, "all", problems)
    if packed is None or not share:
        return blocks, 0
    wanted = max(1, round(share / (1.0 - share) * len(blocks.train)))
    mixed = resample_blocks(packed, wanted)
    mixed.members = [[m + len(blocks.sources) for m in block] for block in mixed.members]
    train = concatenate_blocks(blocks.train, mixed)
    stats = {**blocks.stats, "train_blocks": len(train)}
    return RunBlocks(train=train, valid=blocks.valid, stats=stats, sources=blocks.sources + examples.sources), wanted


def _join(text: PackedBlocks | None, instructions: PackedBlocks | None) -> PackedBlocks | None:
    if text is None or len(text) == 0:
        return instructions
    if instructions is None:
        return text
    return concatenate_blocks(text, instructions)


GENERAL_SAMPLE = "builtin"  # eval.general's default: the general-English sample shipped with lorafit
GENERAL_SAMPLE_FILE = Path(__file__).resolve().parent / "general_english.jsonl"


def eval_files(paths: list[str]) -> list[Path]:
    """Files named by evaluation settings; GENERAL_SAMPLE stands for lorafit's shipped sample."""
    named = [str(GENERAL_SAMPLE_FILE) if path == GENERAL_SAMPLE else path for path in paths]
    return find_files(named)


def load_eval_blocks(
    paths: list[str],
    data: DataSection,
    tokenizer,
    seq_len: int,
    template: ChatTemplate | None = None,
    problems: Problems | None = None,
) -> PackedBlocks:
    """Held-out evaluation data (domain text, general English) as validation-style blocks. Text
    (JSONL 'text' records used as they are, raw documents read like `prepare` reads them) has every
    token scored; instruction files have their answers scored, as in training."""
    problems = problems if problems is not None else Problems()
    formats: dict[str, str] = {}
    # data.format describes the training files; each evaluation file shows its own format.
    data = data.model_copy(update={"format": "auto"})
    groups = _group_by_format(eval_files(paths), data, formats)
    text = conversations = None
    if "text" in groups:  # read and cleaned as training text is, none held out
        documents = _read_text(groups["text"], data, 0.0, None, problems)[0]
        text = _pack_document_text(documents, tokenizer, seq_len, keep_tail=True)[0]
    if any(fmt != "text" for fmt in groups):
        if template is None:
            instruction_files = [f for fmt, files in groups.items() if fmt != "text" for f in files]
            raise DataError(
                f"{instruction_files[0]}: instruction records where plain text is expected (a text-only run has "
                "no chat template to render them); use JSONL 'text' records or documents."
            )
        # Deduplicated like training records; not decontaminated (these are the evaluation sets).
        records = _read_instructions(groups, data, problems, decontaminate=False)[0]
        conversations = _pack_conversations(records, tokenizer, seq_len, template, "all", problems)[0]
    blocks = _join(text, conversations)
    if blocks is None or len(blocks) == 0:
        raise DataError(
            f"No evaluation text in {', '.join(paths)}{first_problems(problems)}; expected JSONL records with a "
            f"'{data.text_field}' field, instruction records, or documents."
        )
    return blocks

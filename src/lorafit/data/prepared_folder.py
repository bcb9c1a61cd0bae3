"""`prepare` to a folder, streamed: train.jsonl and valid.jsonl are written as documents are
decided, then tokenized by the worker processes into memory-mapped shards in the token cache
(where training finds them), and stats.json is written last.

The files are written under temporary names and renamed together once everything (tokenizing
included) is done, so an interrupted prepare leaves the previous output whole (or none), never a
cut file or a mix of two runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.corpus_tokens import tokenize_prepared_file
from lorafit.data.corpus_work import CleanedDocument
from lorafit.data.documents import Problems
from lorafit.data.prepare import PrepareOptions, PrepareTally, kept_documents, nothing_left_error, prepare_stats
from lorafit.data.token_shards import TextsFingerprint
from lorafit.data.work_pool import worker_count
from lorafit.io import partial_path, to_json, write_json_atomic

SIDES = ("train", "valid")


@dataclass
class PreparedFolder:
    paths: dict[str, Path]  # train, valid, stats
    stats: dict
    problems: Problems


@dataclass
class SideFile:
    """One output JSONL being written under its temporary name."""

    path: Path
    documents: int = 0
    chars: int = 0
    fingerprint: TextsFingerprint = field(default_factory=TextsFingerprint)

    def __post_init__(self) -> None:
        self.partial = partial_path(self.path)
        self.handle = self.partial.open("wb")

    def write(self, text: str, source: str) -> None:
        self.write_line((to_json({"text": text, "source": source}) + "\n").encode("utf-8"), text)

    def write_line(self, line: bytes, text: str) -> None:
        """A record already encoded (`line`, whose text is `text`), counted and fingerprinted."""
        self.handle.write(line)
        self.fingerprint.add(text)
        self.documents += 1
        self.chars += len(text)

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()


@dataclass
class StreamSplit:
    """Train or validation per document by its split position, as `split_documents` decides for a
    list: a set whose ratio picked no validation document holds out its lowest-position one, and a
    single document stays in training. Those two cases are only known at the end."""

    valid_ratio: float
    lowest: tuple[float, int, CleanedDocument] | None = None  # lowest position among train documents

    def side(self, document: CleanedDocument, train_written: int) -> str:
        if self.valid_ratio > 0 and document.split_position < self.valid_ratio:
            return "valid"
        if self.lowest is None or document.split_position < self.lowest[0]:
            self.lowest = (document.split_position, train_written, document)
        return "train"


Report = Callable[..., None]


def prepare_to_folder(
    inputs: list[str],
    options: PrepareOptions,
    out_dir: Path,
    tokenizer=None,
    report: Report | None = None,
) -> PreparedFolder:
    """Prepare `inputs` into out_dir/train.jsonl, valid.jsonl and stats.json, streaming; with a
    tokenizer, both files are tokenized into cached token shards and stats.json counts tokens.
    `report(stage, **counts)` follows the stages ('clean', 'tokenize')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {side: out_dir / f"{side}.jsonl" for side in SIDES} | {"stats": out_dir / "stats.json"}
    files = {side: SideFile(paths[side]) for side in SIDES}
    tally = PrepareTally()
    try:
        _write_documents(inputs, options, tally, files, report)
        for side_file in files.values():
            side_file.close()
        stats = prepare_stats(tally, {side: (files[side].documents, files[side].chars) for side in SIDES})
        if tokenizer is not None:
            stats.update(_tokenize(files, tokenizer, worker_count(options.workers), report))
        # Renamed together at the end: an interrupted prepare leaves the previous output whole.
        for side_file in files.values():
            os.replace(side_file.partial, side_file.path)
        write_json_atomic(paths["stats"], {**stats, "problems": tally.problems.records()})
    finally:
        for side_file in files.values():
            side_file.close()
            side_file.partial.unlink(missing_ok=True)
    return PreparedFolder(paths=paths, stats=stats, problems=tally.problems)


def _tokenize(files: dict[str, SideFile], tokenizer, workers: int, report: Report | None) -> dict[str, int]:
    """Both written files tokenized into cached shards; their token counts."""
    counts = {}
    for side, side_file in files.items():
        shard = tokenize_prepared_file(
            side_file.partial,
            side_file.fingerprint.hexdigest(),
            tokenizer,
            workers,
            None if report is None else lambda texts, tokens: report("tokenize", texts=texts, tokens=tokens),
        )
        counts[f"{side}_tokens"] = shard.tokens
    return counts


def _write_documents(
    inputs: list[str], options: PrepareOptions, tally: PrepareTally, files: dict[str, SideFile], report
) -> None:
    split = StreamSplit(options.valid_ratio)
    clean_report = None
    if report is not None:
        clean_report = lambda size, read, kept: report("clean", bytes=size, documents=read, kept=kept)  # noqa: E731
    for document in kept_documents(inputs, options, tally, clean_report):
        files[split.side(document, files["train"].documents)].write(document.text, document.source)
    if not tally.kept:
        raise nothing_left_error(inputs, tally, options)
    if options.valid_ratio > 0 and tally.kept >= 2 and not files["valid"].documents:
        _hold_out(split.lowest, files)
    elif tally.kept == 1 and files["valid"].documents:
        _keep_single_in_train(files)


def _hold_out(lowest: tuple[float, int, CleanedDocument], files: dict[str, SideFile]) -> None:
    """Move the lowest-position training document to validation (rewriting train without it)."""
    _, line_number, document = lowest
    train = files["train"]
    train.close()
    written = train.partial.with_name(train.partial.name + "-all")
    os.replace(train.partial, written)
    rewritten = SideFile(train.path)
    with written.open("rb") as lines:
        for number, line in enumerate(lines):
            if number != line_number:
                rewritten.write_line(line, _line_text(line))
    written.unlink()
    files["train"] = rewritten
    files["valid"].write(document.text, document.source)


def _keep_single_in_train(files: dict[str, SideFile]) -> None:
    """A single document stays in training (there is nothing to hold out beside it)."""
    valid = files["valid"]
    valid.close()
    line = valid.partial.read_bytes()
    files["valid"] = SideFile(valid.path)  # empty again
    files["train"].write_line(line, _line_text(line))


def _line_text(line: bytes) -> str:
    return json.loads(line)["text"]

"""Corpora larger than memory: streaming `prepare` in worker processes, the compact duplicate
index, token shards on disk that packing and training read, and resume from them."""

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from datasketch import MinHashLSH
from safetensors.torch import load_file
from test_cli import make_corpus, write_config
from test_resume import lorafit, metrics, without_speed

from lorafit.data import corpus_tokens, corpus_work, dedup_index
from lorafit.data.clean import exact_key, normalize_text
from lorafit.data.decontaminate import drop_contaminated, excluded_ngrams
from lorafit.data.dedup import NUM_PERM, drop_near_duplicates, minhash_of
from lorafit.data.documents import Document, Problems
from lorafit.data.pack import pack_documents
from lorafit.data.prepare import PrepareOptions
from lorafit.data.prepared_folder import prepare_to_folder
from lorafit.data.readers import read_documents
from lorafit.data.records import iter_records, line_ranges
from lorafit.data.split import split_documents
from lorafit.data.token_shards import TokenShard
from lorafit.data.tokenize import tokenize_cached, tokenize_texts

WORDS = [
    "iterator",
    "generator",
    "list",
    "tuple",
    "dict",
    "set",
    "module",
    "import",
    "class",
    "function",
    "method",
    "attribute",
    "exception",
    "context",
    "manager",
    "decorator",
    "closure",
    "scope",
    "namespace",
    "bytes",
    "string",
    "format",
]


def _paragraph(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def _perturbed(text: str, rng: random.Random, share: float) -> str:
    words = text.split()
    for _ in range(max(1, int(len(words) * share))):
        words[rng.randrange(len(words))] = rng.choice(WORDS).upper()
    return " ".join(words)


def make_messy_corpus(folder: Path) -> tuple[Path, Path]:
    """Files of every kind with exact and near duplicates (across files and parts of a JSONL file),
    short and empty documents, unreadable lines and a document sharing a passage with an
    evaluation set; (corpus folder, evaluation file)."""
    rng = random.Random(7)
    originals = [_paragraph(rng, 120) for _ in range(40)]
    records = []
    for i, text in enumerate(originals):
        records.append({"text": text, "source": f"orig-{i}"})
        if i % 4 == 0:
            records.append({"text": text.upper() + "  ", "source": f"exact-{i}"})
        if i % 5 == 0:
            records.append({"text": _perturbed(text, rng, 0.02), "source": f"near-{i}"})
        if i % 9 == 0:
            records.append({"text": "too short", "source": f"short-{i}"})
    write_jsonl(folder / "big.jsonl", records)
    with (folder / "big.jsonl").open("a") as handle:
        handle.write("{not json\n\n")
        handle.write(json.dumps({"body": "no text field"}) + "\n")
    (folder / "notes.md").write_text(originals[3])  # an exact duplicate in another file
    (folder / "page.html").write_text(f"<html><body><main><p>{_paragraph(rng, 90)}</p></main></body></html>")
    (folder / "empty.txt").write_text("   \n")
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 80)
    evaluation = write_jsonl(folder.parent / "eval.jsonl", [{"question": originals[11][:200], "answer": "x"}])
    return folder, evaluation


def reference_prepare(inputs: list[str], options: PrepareOptions) -> tuple[list[Document], list[Document], dict]:
    """The pipeline as it ran before streaming: everything in memory, datasketch's own index."""
    problems = Problems()
    raw = read_documents(inputs, options.text_field, problems)
    removed = dict.fromkeys(("empty", "too_short", "exact_duplicate", "near_duplicate", "contaminated"), 0)
    cleaned = []
    for doc in raw:
        text = normalize_text(doc.text)
        reason = "empty" if not text else "too_short" if len(text) < options.min_chars else None
        if reason:
            removed[reason] += 1
        else:
            cleaned.append(Document(text, doc.source))
    seen, unique = set(), []
    for doc in cleaned:
        if exact_key(doc.text) not in seen:
            seen.add(exact_key(doc.text))
            unique.append(doc)
    removed["exact_duplicate"] = len(cleaned) - len(unique)
    lsh, signatures, kept = MinHashLSH(threshold=options.near_dup_threshold, num_perm=NUM_PERM), {}, []
    for index, doc in enumerate(unique):
        signature = minhash_of(doc.text)
        if any(signature.jaccard(signatures[key]) >= options.near_dup_threshold for key in lsh.query(signature)):
            continue
        lsh.insert(str(index), signature)
        signatures[str(index)] = signature
        kept.append(doc)
    removed["near_duplicate"] = len(unique) - len(kept)
    if options.exclude:
        kept, removed["contaminated"] = drop_contaminated(
            kept, excluded_ngrams(options.exclude, options.exclude_ngram), options.exclude_ngram
        )
    train, valid = split_documents(kept, options.valid_ratio)
    return train, valid, removed


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_two_workers_write_what_one_writes_and_what_the_in_memory_pipeline_kept(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    corpus, evaluation = make_messy_corpus(tmp_path / "corpus")
    monkeypatch.setattr(corpus_work, "JSONL_PART_BYTES", 4096)  # the JSONL file in several parts
    monkeypatch.setattr(corpus_tokens, "TOKENIZE_PART_BYTES", 4096)
    assert len(corpus_work.plan_units([corpus / "big.jsonl"])) > 5
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    options = {"min_chars": 50, "valid_ratio": 0.2, "exclude": [str(evaluation)]}
    one = prepare_to_folder([str(corpus)], PrepareOptions(**options, workers=1), tmp_path / "one", tokenizer)
    prepare_to_folder([str(corpus)], PrepareOptions(**options, workers=2), tmp_path / "two", tokenizer)

    for name in ("train.jsonl", "valid.jsonl", "stats.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    train, valid, removed = reference_prepare([str(corpus)], PrepareOptions(**options))
    assert _texts(one.paths["train"]) == [d.text for d in train]
    assert _texts(one.paths["valid"]) == [d.text for d in valid]
    assert {k: v for k, v in one.stats["removed"].items() if k != "unreadable"} == removed
    # Every kind of removal happened, and the unreadable lines and file are named with their line.
    assert all(one.stats["removed"][reason] for reason in removed), one.stats["removed"]
    wheres = [p.where for p in one.problems.items]
    lines = len((corpus / "big.jsonl").read_text().splitlines())
    assert f"{corpus / 'big.jsonl'}:{lines - 2}" in wheres and f"{corpus / 'big.jsonl'}:{lines}" in wheres
    assert any(w.endswith("latin1.txt") for w in wheres)
    # Token counts come from the shards the workers wrote, equal to tokenizing in this process.
    assert one.stats["train_tokens"] == sum(len(ids) for ids in tokenize_texts([d.text for d in train], tokenizer))


def test_training_packs_the_shards_prepare_wrote_without_tokenizing_again(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = prepare_to_folder(
        [str(make_corpus(tmp_path / "docs"))], PrepareOptions(min_chars=50, workers=2), tmp_path / "out", tokenizer
    )
    texts = _texts(prepared.paths["train"])
    fresh = tokenize_texts(texts, tokenizer)
    monkeypatch.setattr("lorafit.data.tokenize.tokenize_texts", lambda *a: pytest.fail("tokenized again"))
    shard = tokenize_cached(texts, tokenizer)
    assert isinstance(shard, TokenShard) and isinstance(shard.stream, np.memmap)
    assert shard.stream.dtype == np.uint16  # the vocabulary fits: two bytes a token on disk
    assert [ids.tolist() for ids in shard] == [ids.tolist() for ids in fresh]

    blocks = pack_documents(shard, tokenizer.eos_token_id, seq_len=16)
    in_memory = pack_documents(fresh, tokenizer.eos_token_id, seq_len=16)
    assert isinstance(blocks.input_ids.base, np.memmap) or isinstance(blocks.input_ids, np.memmap)  # a view
    assert np.array_equal(blocks.input_ids, in_memory.input_ids)
    assert blocks.digest() == in_memory.digest()  # resume fingerprints unchanged
    assert list(blocks.members) == list(in_memory.members)
    tail = pack_documents(shard, tokenizer.eos_token_id, seq_len=16, keep_tail=True)
    assert tail.digest() == pack_documents(fresh, tokenizer.eos_token_id, seq_len=16, keep_tail=True).digest()


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95, 1.0])
def test_the_compact_index_keeps_what_datasketch_keeps(threshold):
    rng = random.Random(threshold)
    base = [_paragraph(rng, 60) for _ in range(30)]
    documents = [Document(text, str(i)) for i, text in enumerate(base)]
    documents += [Document(_perturbed(rng.choice(base), rng, rng.uniform(0, 0.3)), "p") for _ in range(90)]
    documents += [Document(text.upper(), "same words") for text in base[:10]]
    rng.shuffle(documents)
    kept, _ = drop_near_duplicates(documents, threshold)
    if threshold < 1.0:
        lsh, signatures, expected = MinHashLSH(threshold=threshold, num_perm=NUM_PERM), {}, []
        for index, doc in enumerate(documents):
            signature = minhash_of(doc.text)
            if any(signature.jaccard(signatures[k]) >= threshold for k in lsh.query(signature)):
                continue
            lsh.insert(str(index), signature)
            signatures[str(index)] = signature
            expected.append(doc)
    else:
        seen, expected = set(), []
        for doc in documents:
            key = minhash_of(doc.text).hashvalues.tobytes()
            if key not in seen:
                seen.add(key)
                expected.append(doc)
    assert [d.text for d in kept] == [d.text for d in expected]
    assert 30 <= len(kept) < len(documents)


def test_key_table_finds_every_key_across_merges(monkeypatch):
    monkeypatch.setattr(dedup_index, "MERGE_AT_LEAST", 16)
    table = dedup_index.KeyTable()
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64 - 1, size=500, dtype=np.uint64).tolist()
    for number, key in enumerate(keys):
        table.add(key, number)
        table.add(keys[number // 2], 10_000 + number)  # repeated keys keep every value
    assert len(table) == 1000
    for number, key in enumerate(keys):
        assert number in table.get(key)
    assert table.get(2**64 - 1) == [] or (2**64 - 1) in keys


def test_line_ranges_read_every_line_once_with_its_number(tmp_path):
    rng = random.Random(3)
    lines = [json.dumps({"text": "x" * rng.randint(0, 400), "n": i}) for i in range(300)]
    lines[17] = "{broken"
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines))  # no newline at the end
    whole_problems = Problems()
    whole = list(iter_records(path, whole_problems))
    for part in (1, 100, 5000, 10**7):
        problems, parts = Problems(), []
        for start, end, first in line_ranges(path, part):
            parts.extend(iter_records(path, problems, start, end, first))
        assert parts == whole
        assert [p.where for p in problems.items] == [p.where for p in whole_problems.items] == [f"{path}:18"]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_small_sets_split_as_the_in_memory_split_does(tmp_path, count):
    rng = random.Random(count)
    texts = [_paragraph(rng, 40) for _ in range(count)]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    # A ratio that selects nothing in small sets: the lowest-position document is held out.
    written = prepare_to_folder([str(source)], PrepareOptions(min_chars=10, valid_ratio=0.01), tmp_path / "out")
    train, valid = split_documents([Document(t, "") for t in texts], 0.01)
    assert _texts(written.paths["train"]) == [d.text for d in train]
    assert _texts(written.paths["valid"]) == [d.text for d in valid]
    assert (written.stats["train_documents"], written.stats["valid_documents"]) == (len(train), len(valid))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".lorafit-tmp")]


def test_a_run_on_prepared_shards_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, tiny_model_dir):
    prepared = tmp_path / "prepared"
    made = lorafit(
        "prepare", str(make_corpus(tmp_path / "docs")), "--out", str(prepared), "--base", str(tiny_model_dir),
        "--min-chars", "50", "--valid-ratio", "0.25", "--workers", "2",
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    shards = sorted(p.name for p in (Path(tmp_path / "lorafit-home") / "tokens").iterdir())
    assert len(shards) == 2  # train and valid
    config = write_config(tmp_path, tiny_model_dir, prepared / "train.jsonl", max_steps=8, save_every=3)
    loaded = yaml.safe_load(config.read_text())
    loaded["data"].update(valid=[str(prepared / "valid.jsonl")], workers=2)
    config.write_text(yaml.safe_dump(loaded))

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert lorafit("train", str(config), "--out", str(whole)).returncode == 0
    killed = lorafit("train", str(config), "--out", str(broken), fault="kill_after_step:5")
    assert killed.returncode == -signal.SIGKILL
    loaded["data"]["workers"] = 1  # the worker count is not an input: resuming with another is fine
    config.write_text(yaml.safe_dump(loaded))
    resumed = lorafit("train", str(config), "--out", str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_speed(metrics(broken)) == without_speed(metrics(whole))
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_prepare_leaves_no_workers_and_the_previous_output_whole(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    import time

    import psutil

    rng = random.Random(5)
    corpus = write_jsonl(tmp_path / "big.jsonl", [{"text": _paragraph(rng, 400)} for _ in range(6000)])
    out = tmp_path / "out"
    env = {**os.environ, "LORAFIT_HOME": str(tmp_path / "lorafit-home")}
    small = write_jsonl(tmp_path / "small.jsonl", [json.loads(line) for line in corpus.read_text().splitlines()[:30]])
    earlier = lorafit("prepare", str(small), "--out", str(out), "--base", str(tiny_model_dir))
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "valid.jsonl", "stats.json")}
    command = [sys.executable, "-m", "lorafit.cli", "prepare", str(corpus), "--out", str(out), "--overwrite"]
    process = subprocess.Popen(
        [*command, "--base", str(tiny_model_dir), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while len(parent.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = parent.children()
    assert len(workers) >= 2, "the workers never started"
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    running = []
    for worker in alive:  # a dead worker nobody has reaped yet (a zombie) is gone too
        try:
            if worker.status() != psutil.STATUS_ZOMBIE:
                running.append(worker)
        except psutil.NoSuchProcess:
            pass
    assert not running, f"workers outlived the killed command: {running}"
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing half-replaced


def test_a_shard_left_half_written_by_a_dead_process_is_swept(tmp_path, tiny_model_dir, isolated_home):
    from transformers import AutoTokenizer

    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = isolated_home / "tokens" / f".lorafit-tmp-{dead}-abc-shard"
    stale.mkdir(parents=True)
    (stale / "tokens.bin").write_bytes(b"\0" * 10)
    shard = tokenize_cached(["some text"], AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(shard) == 1 and not stale.exists()

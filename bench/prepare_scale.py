"""Preparation at scale: streaming `lorafit prepare` on synthetic corpora of ~10M, 30M and 100M
tokens, worker scaling, and training read from the token shards against blocks held in memory.

The corpora are the pydocs pages (../shared/data/pydocs/text) copied with 15% of their words
replaced at random per copy (distinct documents: 5-word shingles overlap ~30%, far below the
near-duplicate threshold 0.8), plus planted duplicates: every 20th document again with its case and
spacing changed (exact) and every 20th again with 0.5% of its words replaced (near, Jaccard ~0.95).
Each prepare runs as its own process with a fresh token cache; its peak RSS is the sum over the
process and its workers, sampled every 0.1 s.

    .venv/bin/python bench/prepare_scale.py [--sizes 10,30,100] [--steps 20] [--work DIR]

Prints per corpus: documents/s, tokens/s, peak RSS, the duplicates found against those planted and
any original lost (a false positive); then 1 vs 2 workers on the 10M corpus and on the 354 raw
HTML pages; then 20 training steps of the embedded model on the 10M corpus's shard against the
same blocks copied into memory (the path before shards). Ends with:
RESULT rss_growth_10_to_100=X workers_speedup_jsonl=Y workers_speedup_html=Z shard_vs_memory_tokens_per_s=W
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pydocs"
CHARS_PER_TOKEN = 4.0  # measured below on the real pages; this only sizes the first guess
PLANT_EVERY = 20


def perturb(words: list[str], share: float, rng: random.Random, vocabulary: list[str]) -> list[str]:
    out = list(words)
    for _ in range(max(1, int(len(out) * share))):
        out[rng.randrange(len(out))] = rng.choice(vocabulary)
    return out


def build_corpus(path: Path, million_tokens: int, chars_per_token: float) -> dict:
    """Write the corpus once (reused by later runs); returns what was planted."""
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    pages = [
        json.loads(line)["text"]
        for name in ("train", "valid")
        for line in (DATA / "text" / f"{name}.jsonl").read_text().splitlines()
    ]
    vocabulary = sorted({w for page in pages[:50] for w in page.split()})
    rng = random.Random(million_tokens)
    wanted_chars = million_tokens * 1_000_000 * chars_per_token
    written = planted_exact = planted_near = originals = 0
    partial = path.with_suffix(".partial")
    with partial.open("w") as out:
        copy = 0
        while written < wanted_chars:
            for number, page in enumerate(pages):
                words = perturb(page.split(" "), 0.15, rng, vocabulary)
                text = " ".join(words)
                out.write(json.dumps({"text": text, "source": f"orig-{copy}-{number}"}) + "\n")
                originals += 1
                written += len(text)
                if originals % PLANT_EVERY == 0:
                    exact = text.upper().replace(" ", "  ")
                    out.write(json.dumps({"text": exact, "source": f"planted-exact-{copy}-{number}"}) + "\n")
                    planted_exact += 1
                if originals % PLANT_EVERY == PLANT_EVERY // 2:
                    near = " ".join(perturb(words, 0.005, rng, vocabulary))
                    out.write(json.dumps({"text": near, "source": f"planted-near-{copy}-{number}"}) + "\n")
                    planted_near += 1
                if written >= wanted_chars:
                    break
            copy += 1
    partial.rename(path)
    meta = {
        "originals": originals,
        "planted_exact": planted_exact,
        "planted_near": planted_near,
        "bytes": path.stat().st_size,
    }
    meta_path.write_text(json.dumps(meta))
    return meta


def fresh_home(work: Path, name: str) -> Path:
    """A LORAFIT_HOME with an empty token cache, sharing the converted embedded model."""
    home = work / "homes" / name
    if home.exists():
        subprocess.run(["rm", "-rf", str(home)], check=True)
    home.mkdir(parents=True)
    shared = Path(os.environ.get("LORAFIT_HOME", Path.home() / ".cache" / "lorafit")) / "models"
    (home / "models").symlink_to(shared, target_is_directory=True)
    return home


def run_measured(command: list[str], env: dict) -> tuple[float, int, subprocess.CompletedProcess]:
    """(seconds, peak RSS of the process tree in bytes, result)."""
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = process.stdout.read()
    seconds = time.perf_counter() - began
    result = subprocess.CompletedProcess(command, process.returncode, output, "")
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return seconds, peak, result


def prepare(work: Path, inputs: Path, name: str, workers: int, extra: list[str] = (), one_core: bool = False) -> dict:
    """`lorafit prepare` in its own process; `one_core`: without the tokenizer's own threads (which
    run on every core), so that one worker is one core."""
    home = fresh_home(work, name)
    out = work / "prepared" / name
    command = [sys.executable, "-m", "lorafit.cli", "prepare", str(inputs), "--out", str(out), "--overwrite"]
    command += ["--workers", str(workers), *extra]
    env = {**os.environ, "LORAFIT_HOME": str(home)}
    if one_core:
        env["TOKENIZERS_PARALLELISM"] = "false"
    seconds, peak, _ = run_measured(command, env)
    stats = json.loads((out / "stats.json").read_text())
    return {"seconds": seconds, "peak_rss": peak, "stats": stats, "out": out, "home": home}


def lost_originals(out: Path, originals: int) -> tuple[int, int]:
    """(originals missing from the outputs, planted duplicates left in them)."""
    kept_originals = planted_left = 0
    for name in ("train.jsonl", "valid.jsonl"):
        with open(out / name) as lines:
            for line in lines:
                source = json.loads(line)["source"]
                kept_originals += source.startswith("orig-")
                planted_left += source.startswith("planted-")
    return originals - kept_originals, planted_left


TRAIN_WRAPPER = """
import sys
import numpy as np
if sys.argv[1] == "memory":  # the path before shards: every block copied into memory as int64
    from lorafit.compute import batches
    original = batches.BlockTensors.from_packed.__func__
    def in_memory(cls, blocks):
        copy = lambda a: None if a is None else np.array(a, dtype=np.int64)
        return cls(copy(blocks.input_ids), copy(blocks.labels), copy(blocks.position_ids))
    batches.BlockTensors.from_packed = classmethod(in_memory)
from lorafit.cli.app import app
sys.argv = ["lorafit", *sys.argv[2:]]
app()
"""


def train_speed(work: Path, prepared: dict, mode: str, steps: int, home: Path) -> dict:
    valid = work / "small-valid.jsonl"
    with open(prepared["out"] / "valid.jsonl") as lines:
        valid.write_text("".join(next(lines) for _ in range(8)))
    config = {
        "model": {"base": ""},
        "data": {"train": [str(prepared["out"] / "train.jsonl")], "valid": [str(valid)]},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "train": {"seq_len": 512, "micro_batch_size": 4, "max_steps": steps, "eval_every": 10_000,
                  "save_every": 0, "precision": "auto"},
        "eval": {"general": [], "prompts": ["Python lists"], "max_new_tokens": 4, "report": False},
    }  # fmt: skip
    path = work / f"train-{mode}.json"
    path.write_text(json.dumps(config))
    out = work / "runs" / mode
    command = [sys.executable, "-c", TRAIN_WRAPPER, mode, "train", str(path), "--out", str(out), "--overwrite"]
    seconds, peak, _ = run_measured(command, {**os.environ, "LORAFIT_HOME": str(home)})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r and r.get("step", 0) > 2]
    return {"tokens_per_s": statistics.median(speeds), "peak_rss": peak, "seconds": seconds}


def index_memory(documents: int) -> tuple[float, float]:
    """Bytes per million documents: lorafit's two duplicate indexes (random signatures, so every
    document is kept and indexed), and the in-memory pipeline's (datasketch MinHashLSH with the
    signatures kept for confirmation) on a tenth as many. RSS growth of this process, in bytes."""
    import gc

    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from lorafit.data.dedup import NUM_PERM, near_duplicate_index
    from lorafit.data.dedup_index import ExactKeys

    rng = np.random.default_rng(0)
    me = psutil.Process()
    gc.collect()
    before = me.memory_info().rss
    exact, near = ExactKeys(), near_duplicate_index(0.8)
    for start in range(0, documents, 10_000):
        signatures = rng.integers(0, 2**32 - 1, size=(10_000, NUM_PERM), dtype=np.uint32)
        for row, signature in enumerate(signatures):
            near.add_unless_duplicate(signature)
            exact.add_unless_seen(int(rng.integers(0, 2**63)) + start + row)
    ours = (me.memory_info().rss - before) / documents * 1e6
    near.close()
    del exact, near
    gc.collect()
    before = me.memory_info().rss
    lsh, kept, fewer = MinHashLSH(threshold=0.8, num_perm=NUM_PERM), {}, documents // 10
    for number in range(fewer):
        signature = MinHash(num_perm=NUM_PERM, seed=1)  # as the in-memory pipeline made them
        signature.update_batch([f"{number} {k}".encode() for k in range(8)])
        lsh.insert(str(number), signature)
        kept[str(number)] = signature
    theirs = (me.memory_info().rss - before) / fewer * 1e6
    return ours, theirs


def batch_read_seconds(work: Path, rounds: int = 2000) -> tuple[float, float]:
    """Seconds to take one 4 x 512 batch from the 10M corpus's token shard, and from the same
    blocks copied into memory (the step's only difference between the two paths)."""
    import numpy as np
    import torch

    from lorafit.compute.batches import BlockStream, BlockTensors
    from lorafit.data.pack import pack_documents
    from lorafit.data.prepare import load_prepared_jsonl
    from lorafit.data.tokenize import tokenize_cached
    from lorafit.model.load import load_tokenizer, resolve_base

    os.environ["LORAFIT_HOME"] = str(work / "homes" / "10M-2w")  # where that prepare left its shards
    tokenizer = load_tokenizer(resolve_base(""))
    documents, _ = load_prepared_jsonl([work / "prepared" / "10M-2w" / "train.jsonl"])
    blocks = pack_documents(tokenize_cached([d.text for d in documents], tokenizer), tokenizer.eos_token_id, 512)
    shard = BlockTensors.from_packed(blocks)
    memory = BlockTensors(np.array(blocks.input_ids, dtype=np.int64), None, None)
    timings = []
    for tensors in (shard, memory):
        stream = BlockStream(num_blocks=len(tensors), batch_size=4, seed=0)
        began = time.perf_counter()
        for _ in range(rounds):
            tensors.batch(stream.next_indices(), torch.device("cpu"))
        timings.append((time.perf_counter() - began) / rounds)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,30,100", help="corpus sizes in millions of tokens")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorafit-prepare-scale"))
    parser.add_argument("--index-documents", type=int, default=0, help="only measure the indexes' memory")
    args = parser.parse_args()
    if args.index_documents:
        ours, theirs = index_memory(args.index_documents)
        print(
            f"duplicate indexes, {args.index_documents:,} documents: {ours / 2**20:,.0f} MiB per million documents "
            f"(datasketch MinHashLSH + kept signatures: {theirs / 2**20:,.0f} MiB per million)"
        )
        if (args.work / "prepared" / "10M-2w" / "train.jsonl").is_file():
            shard, memory = batch_read_seconds(args.work)
            print(f"taking a 4 x 512 batch: {shard * 1e6:,.0f} us from the shard, {memory * 1e6:,.0f} us from memory")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch
    import transformers

    import lorafit

    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; python {platform.python_version()}, lorafit "
        f"{lorafit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    sample = build_corpus(args.work / "corpus-sample.jsonl", 1, CHARS_PER_TOKEN)
    measured = prepare(args.work, args.work / "corpus-sample.jsonl", "sample", 2)
    chars_per_token = (measured["stats"]["train_chars"] + measured["stats"]["valid_chars"]) / (
        measured["stats"]["train_tokens"] + measured["stats"]["valid_tokens"]
    )
    print(f"{chars_per_token:.2f} characters per token (SmolLM2 tokenizer, {sample['originals']} sample documents)")

    # The command's fixed cost (interpreter, imports, tokenizer), taken off the rates below.
    tiny = args.work / "one-document.jsonl"
    tiny.write_text(json.dumps({"text": "A single document for the start-up time. " * 20}) + "\n")
    startup = min(prepare(args.work, tiny, "startup", 2, ["--valid-ratio", "0"])["seconds"] for _ in range(2))
    print(f"start-up of lorafit prepare (one document): {startup:.1f} s, taken off the rates below")

    results = {}
    for size in sizes:
        corpus = args.work / f"corpus-{size}M.jsonl"
        meta = build_corpus(corpus, size, chars_per_token)
        run = prepare(args.work, corpus, f"{size}M-2w", 2)
        stats, lost, left = run["stats"], *lost_originals(run["out"], meta["originals"])
        tokens = stats["train_tokens"] + stats["valid_tokens"]
        results[size] = run
        net = run["seconds"] - startup
        print(
            f"{size:>4}M: {stats['documents_in']:,} documents, {tokens:,} tokens, {meta['bytes'] / 2**20:,.0f} MiB | "
            f"2 workers {run['seconds']:.0f} s = {stats['documents_in'] / net:,.0f} documents/s, "
            f"{tokens / net:,.0f} tokens/s | peak RSS {run['peak_rss'] / 2**20:,.0f} MiB | duplicates "
            f"exact {stats['removed']['exact_duplicate']}/{meta['planted_exact']} planted, near "
            f"{stats['removed']['near_duplicate']}/{meta['planted_near']} planted, planted left {left}, "
            f"originals lost {lost}"
        )

    first = min(sizes)
    one = prepare(args.work, args.work / f"corpus-{first}M.jsonl", f"{first}M-1w", 1, one_core=True)
    threaded = prepare(args.work, args.work / f"corpus-{first}M.jsonl", f"{first}M-1w-threads", 1)
    two_net = results[first]["seconds"] - startup
    jsonl_speedup = (one["seconds"] - startup) / two_net
    print(
        f"{first}M corpus: 1 worker (one core) {one['seconds']:.0f} s, 2 workers {results[first]['seconds']:.0f} s: "
        f"{jsonl_speedup:.2f}x without start-up; 1 worker with the tokenizer's threads on both cores "
        f"{threaded['seconds']:.0f} s ({(threaded['seconds'] - startup) / two_net:.2f}x)"
    )
    html = DATA / "html"
    html_one = prepare(args.work, html, "html-1w", 1, one_core=True)
    html_two = prepare(args.work, html, "html-2w", 2)
    html_speedup = (html_one["seconds"] - startup) / (html_two["seconds"] - startup)
    print(
        f"354 HTML pages: 1 worker {html_one['seconds']:.1f} s, 2 workers {html_two['seconds']:.1f} s: "
        f"{html_speedup:.2f}x without start-up ({354 / (html_two['seconds'] - startup):.1f} pages/s)"
    )

    home = results[first]["home"]  # holds the shards this corpus's prepare wrote
    # Alternated (shard, memory, shard, memory) so a machine that speeds up or slows down affects both.
    runs = [(mode, train_speed(args.work, results[first], mode, args.steps, home)) for mode in ("shard", "memory") * 2]
    speeds = {}
    for mode in ("shard", "memory"):
        mine = [speed for name, speed in runs if name == mode]
        speeds[mode] = {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in mine)}
        print(
            f"train {args.steps} steps from {mode}: "
            + ", ".join(f"{s['tokens_per_s']:,.0f}" for s in mine)
            + f" tokens/s (median of steps 3+ per run), peak RSS {max(s['peak_rss'] for s in mine) / 2**20:,.0f} MiB"
        )
    growth = results[max(sizes)]["peak_rss"] / results[first]["peak_rss"]
    ratio = speeds["shard"]["tokens_per_s"] / speeds["memory"]["tokens_per_s"]
    print(
        f"RESULT rss_growth_{first}_to_{max(sizes)}={growth:.2f} workers_speedup_jsonl={jsonl_speedup:.2f} "
        f"workers_speedup_html={html_speedup:.2f} shard_vs_memory_tokens_per_s={ratio:.3f}"
    )


if __name__ == "__main__":
    main()

"""Long-context training: lorafit at seq_len 512 ... 8,192 against Trainer + PEFT (bf16, SDPA).

Same model (the embedded SmolLM2-135M-Instruct, trained context 8,192), same LoRA as
bench/train_throughput.py (r=8, alpha=32, dropout 0.05, q_proj + v_proj), same packed blocks in
the same order. For each L the micro-batch is 2,048 // L blocks (at least one), so a step holds
2,048 tokens up to L = 2,048 and L tokens beyond. Per L, each in its own process (its own peak
RSS): lorafit without and with gradient checkpointing (the trade-off), and the peer with PyTorch's
SDPA (its CPU flash kernel) and bf16=True. A row at 512 x 16 blocks holds 8,192 tokens per step,
the same as one 8,192 block: the memory reference for "linear in L".

A side that grows past --max-rss-gb is stopped and reported as out of memory at that L (this
machine would start killing processes first); the peer is not run at longer L after that.

    .venv/bin/python bench/long_context.py [--lengths 512,1024,2048,4096,8192] [--steps 4]

Ends with one `RESULT seq_len=L ...` line per L and a `RESULT targets ...` line:
rss_8192_vs_512x16 (peak RSS, both without checkpointing: 8,192 tokens a step either way),
rss_8192_checkpointing_vs_512 (8,192 with checkpointing against 4 x 512 without),
tps_4096_vs_512 (tokens/s, without checkpointing) and min_speedup_vs_peer (over the L the peer ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import train_throughput as shared

TOKENS_PER_STEP = 2048


def rss_of_tree(pid: int) -> int:
    """Resident bytes of a process and its children (a peer may fork data workers)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_side(side: str, args, seq_len: int, batch: int, checkpointing: bool) -> dict:
    """One side at one shape in a child process; {'oom': True} when it outgrew --max-rss-gb."""
    command = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--data",
        str(args.data),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(seq_len),
        "--batch",
        str(batch),
        "--checkpointing",
        str(int(checkpointing)),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    limit = args.max_rss_gb * 2**30
    over = threading.Event()

    def watch() -> None:
        while process.poll() is None:
            if rss_of_tree(process.pid) > limit:
                over.set()
                process.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    watcher.join()
    if over.is_set() or "out of memory" in stderr.lower() or process.returncode == -9:
        return {"oom": True}
    if process.returncode != 0:
        sys.exit(f"{side} at seq_len {seq_len} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    tokens = seq_len * batch
    if side == "peer":
        ends = result["step_ends"]
        seconds = ends[-1] - ends[args.skip - 1]
    else:
        seconds = sum(result["step_seconds"][args.skip :])
    result["tokens_per_s"] = tokens * (args.steps - args.skip) / seconds
    return result


def earlier_peer_results(log: Path) -> dict[tuple[int, int], dict]:
    """(L, micro-batch) -> the peer's result as an earlier run printed it."""
    found = {}
    for line in log.read_text().splitlines():
        if not line.startswith("RESULT seq_len="):
            continue
        fields = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
        shape = (int(fields["seq_len"]), int(fields["micro_batch"]))
        if fields.get("peer") == "out_of_memory":
            found[shape] = {"oom": True}
        elif "peer_tokens_per_s" in fields:
            found[shape] = {
                "tokens_per_s": float(fields["peer_tokens_per_s"]),
                "peak_rss_mb": float(fields["peer_peak_rss_mb"]),
            }
    return found


def cell(result: dict | None) -> str:
    if result is None:
        return f"{'-':>9}{'-':>10}"
    if result.get("oom"):
        return f"{'OOM':>9}{'-':>10}"
    return f"{result['tokens_per_s']:>9.1f}{result['peak_rss_mb']:>10,.0f}"


def child_main(args) -> None:
    if args.child == "peer":
        result = shared.run_peer(args.data, args.steps, "", args.seq_len, args.batch, bool(args.checkpointing))
    else:
        # One held-out document: the validations before and after training are not what is timed here.
        result = shared.run_lorafit(
            args.data, args.steps, "", args.seq_len, args.batch, bool(args.checkpointing), valid_documents=1
        )
        result.pop("summary", None)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of tokens/s (warm-up)")
    parser.add_argument("--data", type=Path, default=shared.DEFAULT_DATA)
    parser.add_argument("--max-rss-gb", type=float, default=20.0)
    parser.add_argument("--no-peer", action="store_true", help="lorafit only")
    parser.add_argument(
        "--peer-from",
        type=Path,
        help="take the peer's figures from the RESULT lines of an earlier run's output (the peer is unchanged "
        "by lorafit's code; it takes most of this script's hour)",
    )
    parser.add_argument("--child", choices=["peer", "lorafit"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file; pass --data with a JSONL of {{'text': ...}} records.")
    lengths = [int(x) for x in args.lengths.split(",")]

    import peft
    import torch
    import transformers

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}; SmolLM2-135M-Instruct, LoRA "
        f"{shared.LORA}; {args.steps} steps, first {args.skip} not timed",
        flush=True,
    )
    earlier = earlier_peer_results(args.peer_from) if args.peer_from else {}
    if earlier:
        print(f"peer: figures from {args.peer_from} (an earlier run of this script)", flush=True)
    run_side("lorafit", args, 512, 1, False)  # fills the model and token caches for every side
    header = f"{'L':>6}{'blocks':>7}{'tokens':>7} | {'lorafit':>9}{'RSS MB':>10} | {'+ckpt':>9}{'RSS MB':>10} | "
    header += f"{'peer':>9}{'RSS MB':>10} | {'speedup':>7}"
    rows: dict[tuple[int, int], dict] = {}
    peer_out = False
    shapes = [(length, max(1, TOKENS_PER_STEP // length)) for length in lengths]
    if 512 in lengths and 8192 in lengths:
        shapes.insert(1, (512, 16))
    print(header, flush=True)
    for length, batch in shapes:
        ours = run_side("lorafit", args, length, batch, False)
        checkpointed = run_side("lorafit", args, length, batch, True)
        peer = None
        if args.peer_from and (length, batch) in earlier:
            peer = earlier[(length, batch)]
        elif not args.no_peer and not peer_out and (length, batch) != (512, 16):
            peer = run_side("peer", args, length, batch, False)
            peer_out = bool(peer.get("oom"))
        rows[(length, batch)] = {"lorafit": ours, "checkpointing": checkpointed, "peer": peer}
        speedup = (
            ours["tokens_per_s"] / peer["tokens_per_s"]
            if peer and not peer.get("oom") and "tokens_per_s" in ours
            else None
        )
        print(
            f"{length:>6}{batch:>7}{length * batch:>7} | {cell(ours)} | {cell(checkpointed)} | {cell(peer)} | "
            f"{'' if speedup is None else f'{speedup:.2f}x':>7}",
            flush=True,
        )
    for (length, batch), row in rows.items():
        ours, checkpointed, peer = row["lorafit"], row["checkpointing"], row["peer"]
        fields = [f"seq_len={length}", f"micro_batch={batch}"]
        for name, result in (("lorafit", ours), ("checkpointing", checkpointed), ("peer", peer)):
            if result is None:
                continue
            if result.get("oom"):
                fields.append(f"{name}=out_of_memory")
            else:
                fields.append(
                    f"{name}_tokens_per_s={result['tokens_per_s']:.1f} {name}_peak_rss_mb={result['peak_rss_mb']:.0f}"
                )
        if peer and not peer.get("oom") and not ours.get("oom"):
            fields.append(f"speedup_vs_peer={ours['tokens_per_s'] / peer['tokens_per_s']:.2f}")
        print("RESULT " + " ".join(fields))

    targets = []
    long_row, short_row, same_tokens_row = rows.get((8192, 1)), rows.get((512, 4)), rows.get((512, 16))

    def rss(row: dict | None, side: str) -> float | None:
        return None if row is None or row[side].get("oom") else row[side]["peak_rss_mb"]

    if rss(long_row, "lorafit") and rss(same_tokens_row, "lorafit"):
        targets.append(f"rss_8192_vs_512x16={rss(long_row, 'lorafit') / rss(same_tokens_row, 'lorafit'):.2f}")
    if rss(long_row, "checkpointing") and rss(short_row, "lorafit"):
        ratio = rss(long_row, "checkpointing") / rss(short_row, "lorafit")
        targets.append(f"rss_8192_checkpointing_vs_512={ratio:.2f}")
    if rss(rows.get((4096, 1)), "lorafit") and rss(short_row, "lorafit"):
        ratio = rows[(4096, 1)]["lorafit"]["tokens_per_s"] / short_row["lorafit"]["tokens_per_s"]
        targets.append(f"tps_4096_vs_512={ratio:.2f}")
    speedups = [
        row["lorafit"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
        for row in rows.values()
        if row["peer"] and not row["peer"].get("oom") and not row["lorafit"].get("oom")
    ]
    if speedups:
        targets.append(f"min_speedup_vs_peer={min(speedups):.2f}")
    print("RESULT targets " + " ".join(targets))


if __name__ == "__main__":
    main()

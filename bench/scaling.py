"""1 vs 2 processes: the same training (embedded model, all-linear LoRA r=16, 4 blocks x 512
tokens per step) in one process and in two processes of 2 blocks each (DDP, or the engine
--distributed names), through `lorafit train --launcher accelerate`. Prints each side's tokens/s
(steps after the first two), wall time and the largest loss difference between the sides' steps.

    .venv/bin/python bench/scaling.py [--steps 12] [--data FILE.jsonl] [--distributed fsdp]

Ends with: RESULT processes_2_vs_1_tokens_per_s=X max_loss_diff=Y
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pydocs" / "text" / "train.jsonl"


def config(data: Path, valid: Path, micro: int, steps: int) -> dict:
    return {
        "data": {"train": [str(data)], "valid": [str(valid)]},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "train": {"seq_len": 512, "micro_batch_size": micro, "max_steps": steps, "eval_every": 0, "lr": 1e-3},
        "eval": {"max_new_tokens": 1, "general": []},
    }


def train(folder: Path, name: str, settings: dict, *launch: str) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    started = time.perf_counter()
    command = [sys.executable, "-m", "lorafit.cli", "train", str(path), "--out", str(folder / name), *launch]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    lines = (folder / name / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "loss" in r]
    return {"steps": steps, "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--distributed", default="ddp", help="ddp, fsdp, deepspeed-zero2 or deepspeed-zero3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        valid = folder / "valid.jsonl"
        valid.write_text("\n".join(args.data.with_name("valid.jsonl").read_text().splitlines()[:2]) + "\n")
        one = train(folder, "one", config(args.data, valid, 4, args.steps))
        launch = ("--launcher", "accelerate", "--distributed", args.distributed)
        two = train(folder, "two", config(args.data, valid, 2, args.steps), *launch)
    for name, run in (("1 process ", one), (f"2 processes ({args.distributed})", two)):
        timed = run["steps"][2:]
        # tokens_per_second is the whole step's (every rank's blocks) over its wall time.
        run["tps"] = len(timed) * 2048 / sum(2048 / r["tokens_per_second"] for r in timed)
        print(f"{name}: {run['tps']:.0f} tokens/s, wall {run['wall']:.0f} s, final loss {run['steps'][-1]['loss']}")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one["steps"], two["steps"]))
    print(f"RESULT processes_2_vs_1_tokens_per_s={two['tps'] / one['tps']:.3f} max_loss_diff={diff:.2e}")


if __name__ == "__main__":
    main()

"""LoRA variants against each other, and against full fine-tuning, at the same token budget.

Each variant trains the embedded SmolLM2-135M-Instruct on the pydocs text (continued pretraining)
for --steps optimizer steps of 4 x 512 tokens, in its own `lorafit train` process (so its peak RSS
is its own), and reports: trainable parameters, adapter (or model) size on disk, training
tokens/s, peak RSS, validation perplexity before/after on held-out pydocs pages, and forgetting:
the perplexity change on general English (../shared/data/general/fortunes.jsonl).

    .venv/bin/python bench/lora_variants.py [--steps 30] [--only NAME ...] [--data ../shared/data]
                                            [--report DIR]

Prints a Markdown table and one RESULT line per variant (key=value, for scripts). With --report,
`lorafit eval` then compares every variant in one report (one column each) written to DIR.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
VALID_DOCUMENTS = 8  # held-out pages scored before/after (about 80k tokens)
LORA_LR, FULL_LR = 1e-3, 5e-5  # full fine-tuning at a LoRA learning rate would wreck the model

# Every variant spells out use_rslora: the default (true) is this benchmark's own finding.
ALL_LINEAR = {"r": 16, "alpha": 32, "target_modules": "all-linear", "use_rslora": False}
VARIANTS: dict[str, dict] = {
    "lora-qv-r8": {"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}},
    "all-linear-r16": {"lora": ALL_LINEAR},
    "rslora": {"lora": {**ALL_LINEAR, "use_rslora": True}},
    "dora": {"lora": {**ALL_LINEAR, "use_dora": True}},
    "pissa": {"lora": {**ALL_LINEAR, "init": "pissa_niter_16"}},
    "lora-plus": {"lora": {**ALL_LINEAR, "plus_ratio": 16.0}},
    "full": {"train": {"method": "full", "lr": FULL_LR}},
}


def head_lines(source: Path, count: int, out: Path) -> Path:
    out.write_text("\n".join(source.read_text(encoding="utf-8").splitlines()[:count]) + "\n", encoding="utf-8")
    return out


def run_variant(name: str, steps: int, work: Path, train: Path, valid: Path, general: Path) -> dict:
    spec = VARIANTS[name]
    config = {
        "data": {"train": [str(train)], "valid": [str(valid)]},
        "lora": spec.get("lora", {}),
        "train": {
            "seq_len": 512,
            "micro_batch_size": 4,
            "lr": LORA_LR,
            "max_steps": steps,
            "eval_every": 0,
            "seed": 0,
            **spec.get("train", {}),
        },
        "eval": {"general": [str(general)], "max_new_tokens": 1, "prompts": ["Python"]},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = work / name
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", str(path), "--out", str(out)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stdout + proc.stderr)[-600:]}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "name": name,
        "trainable": summary["trainable_parameters"]["trainable"],
        "saved_mb": summary["saved_bytes"] / 1e6,
        "tokens_per_s": summary["tokens_per_second"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "valid_ppl_before": summary["valid_ppl_before"],
        "valid_ppl_after": summary["valid_ppl_after"],
        "valid_change_pct": summary["valid_ppl_change_percent"],
        "general_ppl_before": summary["general_ppl_before"],
        "general_ppl_after": summary["general_ppl_after"],
        "forgetting_pct": summary["general_ppl_change_percent"],
        "train_tokens": summary["train_tokens"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | trainable params | saved MB | tokens/s | peak RSS MB | valid ppl before → after | "
        "general ppl before → after (forgetting) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error'].splitlines()[-1]} | | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {row['trainable']:,} | {row['saved_mb']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{row['peak_rss_mb']:,.0f} | {row['valid_ppl_before']:.3f} → {row['valid_ppl_after']:.3f} "
            f"({row['valid_change_pct']:+.1f}%) | {row['general_ppl_before']:.2f} → {row['general_ppl_after']:.2f} "
            f"({row['forgetting_pct']:+.1f}%) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding pydocs/ and general/")
    parser.add_argument("--report", type=Path, help="also write a lorafit eval report of every variant here")
    args = parser.parse_args()
    train, valid_all = args.data / "pydocs" / "text" / "train.jsonl", args.data / "pydocs" / "text" / "valid.jsonl"
    general = args.data / "general" / "fortunes.jsonl"
    for path in (train, valid_all, general):
        if not path.is_file():
            sys.exit(f"{path}: missing; pass --data with the folder of the shared data sets.")
    import peft
    import torch
    import transformers

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{args.steps} steps x 4 x 512 tokens each; LoRA lr {LORA_LR:g}, full fine-tuning lr {FULL_LR:g}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        valid = head_lines(valid_all, VALID_DOCUMENTS, work / "valid.jsonl")
        for name in args.only or VARIANTS:
            row = run_variant(name, args.steps, work, train, valid, general)
            rows.append(row)
            print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.report:
            trained = [f"--adapter={row['name']}={work / row['name']}" for row in rows if "error" not in row]
            command = [sys.executable, "-m", "lorafit.cli", "eval", *trained, "--domain", str(valid)]
            command += ["--general", str(general), "--out", str(args.report)]
            subprocess.run(command, check=True)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()

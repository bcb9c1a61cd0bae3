"""Training throughput: lorafit vs the tutorial recipe (transformers Trainer + PEFT), side by side.

Same model (the embedded SmolLM2-135M-Instruct), same packed blocks in the same order, same LoRA
(r=8, alpha=32, dropout 0.05, q_proj + v_proj), batch 4 x 512 tokens, same schedule and steps.
The peer gets its best CPU settings: bf16=True (autocast), no gradient checkpointing, no workers.
Each side runs in its own process so its peak RSS is its own.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--data FILE.jsonl] [--model FOLDER]

On a CUDA machine both sides train on the GPU (the peer with bf16=True, lorafit with precision
auto); --model takes any local Llama-architecture folder instead of the embedded model.

Ends with: RESULT tokens_per_s_ratio=X peak_rss_ratio=Y loss_lorafit=A loss_peer=B
(ratios are lorafit / peer; tokens/s skips the first --skip steps of each side; the losses are
the mean training loss over the last 5 steps, which both sides compute on identical batches.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pydocs" / "text" / "train.jsonl"
SEQ_LEN, BATCH, LR, WARMUP = 512, 4, 2e-4, 2
LORA = {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}


def blocks_in_lorafit_order(data: Path, steps: int, model: str = "", seq_len: int = SEQ_LEN, batch: int = BATCH):
    """The packed blocks each optimizer step sees, in lorafit's (seeded) order."""
    import numpy as np
    import torch

    from lorafit.compute.batches import BlockStream
    from lorafit.data.pack import pack_documents
    from lorafit.data.prepare import load_prepared_jsonl
    from lorafit.data.tokenize import tokenize_cached
    from lorafit.model.load import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(model))
    documents, _ = load_prepared_jsonl([data])
    packed = pack_documents(tokenize_cached([d.text for d in documents], tokenizer), tokenizer.eos_token_id, seq_len)
    blocks = torch.as_tensor(np.asarray(packed.input_ids, dtype=np.int64))  # a token shard is uint16
    stream = BlockStream(num_blocks=len(packed), batch_size=batch, seed=0)
    return torch.cat([blocks[stream.next_indices()] for _ in range(steps)])


def run_peer(
    data: Path,
    steps: int,
    model_spec: str = "",
    seq_len: int = SEQ_LEN,
    batch: int = BATCH,
    checkpointing: bool = False,
) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lorafit.model.load import resolve_base

    ordered = blocks_in_lorafit_order(data, steps, model_spec, seq_len, batch)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return ordered.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ordered[i], "labels": ordered[i], "attention_mask": torch.ones_like(ordered[i])}

    class Timing(TrainerCallback):
        def __init__(self):
            self.step_ends, self.losses = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    model = AutoModelForCausalLM.from_pretrained(resolve_base(model_spec).path, attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    timing = Timing()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="cosine",
            warmup_steps=WARMUP,
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=True,
            use_cpu=not torch.cuda.is_available(),
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            gradient_checkpointing=checkpointing,
            optim="adamw_torch",
            disable_tqdm=True,
        )
        started = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timing]).train()
    from lorafit.model.device import peak_rss_mb

    return {"step_ends": [t - started for t in timing.step_ends], "losses": timing.losses, "peak_rss_mb": peak_rss_mb()}


def run_lorafit(
    data: Path,
    steps: int,
    model_spec: str = "",
    seq_len: int = SEQ_LEN,
    batch: int = BATCH,
    checkpointing: bool | str = False,
    valid_documents: int = 3,
) -> dict:
    from lorafit.config_files import build_config
    from lorafit.training.run import run_training

    with tempfile.TemporaryDirectory() as out:
        config = build_config(
            {
                # An explicit validation file keeps every training document in, so both sides pack
                # exactly the same blocks.
                "model": {"base": model_spec},
                "data": {"train": [str(data)], "valid": [str(valid_file(data, Path(out), valid_documents))]},
                "lora": LORA,
                "train": {
                    "seq_len": seq_len,
                    "micro_batch_size": batch,
                    "gradient_checkpointing": checkpointing,
                    "grad_accum": 1,
                    "lr": LR,
                    "warmup_steps": WARMUP,
                    "min_lr_ratio": 0.0,
                    "max_steps": steps,
                    "eval_every": 0,
                    "eval_max_blocks": 8,
                    "seed": 0,
                    "precision": "auto",
                },
                "eval": {"max_new_tokens": 1},
            },
            "bench",
        )
        result = run_training(config, Path(out) / "run")
        metrics = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_log = [m for m in metrics if "loss" in m]
    return {
        "step_seconds": [seq_len * batch / m["tokens_per_second"] for m in steps_log],
        "losses": [m["loss"] for m in steps_log],
        "peak_rss_mb": result.summary["peak_rss_mb"],
        "summary": result.summary,
    }


def valid_file(data: Path, out: Path, documents: int = 3) -> Path:
    """A few documents of valid.jsonl beside the training file (else of the training file): lorafit
    measures perplexity before and after training, which is not what this benchmark times."""
    sibling = data.with_name("valid.jsonl")
    source = sibling if sibling.is_file() and sibling != data else data
    lines = source.read_text(encoding="utf-8").splitlines()[:documents]
    path = out / "valid-sample.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def child(side: str, data: Path, steps: int, model: str = "") -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", side, "--data", str(data), "--steps", str(steps), "--model", model],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s (warm-up)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="", help="a local model folder (default: the embedded model)")
    parser.add_argument("--child", choices=["peer", "lorafit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_peer if args.child == "peer" else run_lorafit
        result = run(args.data, args.steps, args.model)
        print(json.dumps(result))
        return
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file; pass --data with a JSONL of {{'text': ...}} records.")

    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, GPU {gpu}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )
    print(
        f"settings: {args.model or 'SmolLM2-135M-Instruct'}, LoRA {LORA}, batch {BATCH} x {SEQ_LEN}, {args.steps} "
        f"steps, lr {LR}, data {args.data}"
    )
    child("lorafit", args.data, 1, args.model)  # fills the model and token caches so neither side pays for them
    peer = child("peer", args.data, args.steps, args.model)
    ours = child("lorafit", args.data, args.steps, args.model)

    tokens = SEQ_LEN * BATCH * (args.steps - args.skip)
    peer_seconds = peer["step_ends"][-1] - peer["step_ends"][args.skip - 1]
    ours_seconds = sum(ours["step_seconds"][args.skip :])
    peer_tps, ours_tps = tokens / peer_seconds, tokens / ours_seconds
    loss_peer = sum(peer["losses"][-5:]) / len(peer["losses"][-5:])
    loss_ours = sum(ours["losses"][-5:]) / len(ours["losses"][-5:])
    print(f"{'':10}{'tokens/s':>10}{'peak RSS MB':>13}{'loss (last 5)':>15}")
    print(f"{'peer':10}{peer_tps:>10.1f}{peer['peak_rss_mb']:>13.0f}{loss_peer:>15.4f}")
    print(f"{'lorafit':10}{ours_tps:>10.1f}{ours['peak_rss_mb']:>13.0f}{loss_ours:>15.4f}")
    print("per-step loss peer:   ", " ".join(f"{x:.3f}" for x in peer["losses"]))
    print("per-step loss lorafit:", " ".join(f"{x:.3f}" for x in ours["losses"]))
    rss_ratio = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    print(
        f"RESULT tokens_per_s_ratio={ours_tps / peer_tps:.3f} peak_rss_ratio={rss_ratio:.3f} "
        f"loss_lorafit={loss_ours:.4f} loss_peer={loss_peer:.4f}"
    )


if __name__ == "__main__":
    main()

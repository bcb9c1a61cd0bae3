"""Task-answer generation in `lorafit eval`: continuous batching vs `model.generate` in batches.

Same model (the embedded SmolLM2-135M-Instruct, bf16 where the CPU has it, as `lorafit eval`
runs), same prompts (the pydocs instruction test set rendered with the model's chat template),
greedy, the same end-of-turn stops and token budget. The peer is how lorafit generated task
answers before (and how the tutorials do it): prompts sorted by length, `model.generate` on batches
of --peer-batch (8: `lorafit eval`'s batch before) with left padding, every row decoding until the
batch's longest answer ends. lorafit's is `greedy_generate` as `lorafit eval` calls it now: the
serving engine's continuous batching, --batch rows (32: `--generate-batch-size`), a finished row
taken by the next prompt at once. --peer-batch 32 compares at equal rows.

    .venv/bin/python bench/eval_generation.py [--prompts 175] [--batch 32] [--peer-batch 8] [--max-new-tokens 128]

Ends with: RESULT speedup=X answers_equal=K/N seconds_lorafit=A seconds_peer=B
(speedup = peer time / lorafit time; answers_equal counts identical greedy answers.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = REPO.parent / "shared" / "data" / "pydocs" / "instruct" / "test.jsonl"


def peer_generate(model, tokenizer, prompts, max_new_tokens, device, autocast, batch_size, stops) -> list[str]:
    """The previous greedy_generate: length-sorted batches through `model.generate`, left padded."""
    import torch

    from lorafit.compute.generate import until_stop
    from lorafit.data.tokenize import pad_token_id

    pad_id = pad_token_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids[row, width - len(encoded[index]) :] = torch.as_tensor(encoded[index])
            mask[row, width - len(encoded[index]) :] = 1
        with torch.no_grad(), autocast():
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stops,
            )
        for row, index in enumerate(chunk):
            new = until_stop(output[row, width:].tolist(), stops)
            answers[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=175)
    parser.add_argument("--batch", type=int, default=32, help="rows decoded together (lorafit eval's default)")
    parser.add_argument("--peer-batch", type=int, default=8, help="the peer's batch (lorafit eval's before: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="eval.task_max_new_tokens's default")
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS)
    args = parser.parse_args()
    if not args.tasks.is_file():
        sys.exit(f"{args.tasks}: no such file; pass --tasks with alpaca-style JSONL records.")

    import torch
    import transformers

    from lorafit.compute.generate import generation_mode, greedy_generate
    from lorafit.data.chat_template import end_of_turn_ids, render_prompt, resolve_chat_template
    from lorafit.model.device import autocast_context, compute_dtype, resolve_precision
    from lorafit.model.load import load_causal_lm, load_tokenizer, resolve_base

    ref = resolve_base("")
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    tokenizer = load_tokenizer(ref)
    model = load_causal_lm(ref, compute_dtype(precision)).to(device)
    template = resolve_chat_template(tokenizer, "auto")
    records = [json.loads(line) for line in args.tasks.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for record in records[: args.prompts]:
        question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        prompts.append(render_prompt(tokenizer, template, [{"role": "user", "content": question}]))
    stops = end_of_turn_ids(tokenizer, template)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; {len(prompts)} prompts, rows {args.batch} "
        f"(peer {args.peer_batch}), "
        f"up to {args.max_new_tokens} new tokens, {precision}",
        flush=True,
    )

    def autocast():
        return autocast_context(precision, device)

    with generation_mode(model):
        started = time.perf_counter()
        ours = greedy_generate(model, tokenizer, prompts, args.max_new_tokens, device, autocast, args.batch, stops)
        ours_s = time.perf_counter() - started
        print(f"lorafit (continuous batching): {ours_s:.1f} s", flush=True)
        started = time.perf_counter()
        peer = peer_generate(model, tokenizer, prompts, args.max_new_tokens, device, autocast, args.peer_batch, stops)
        peer_s = time.perf_counter() - started
        print(f"peer (generate in batches):    {peer_s:.1f} s", flush=True)
    equal = sum(a == b for a, b in zip(ours, peer))
    print(
        f"RESULT speedup={peer_s / ours_s:.2f} answers_equal={equal}/{len(prompts)} "
        f"seconds_lorafit={ours_s:.1f} seconds_peer={peer_s:.1f}"
    )


if __name__ == "__main__":
    main()

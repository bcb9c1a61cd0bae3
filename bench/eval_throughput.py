"""Perplexity-evaluation throughput: lorafit's evaluation vs the plain transformers loop tutorials show.

Same model (the embedded SmolLM2-135M-Instruct), same packed 512-token blocks of held-out pydocs
pages, same tokens scored; the two alternate batch by batch, so load changes on a shared machine
hit both alike. The peer is the tutorial loop: batch 1, fp32, `model(ids, labels=ids)`
under `torch.no_grad()`. lorafit is `evaluate_loss` as `lorafit train` runs it: bf16 weights where
the CPU supports it, its block-causal attention, batches of --batch blocks, the fused chunked loss.

    .venv/bin/python bench/eval_throughput.py [--documents 4] [--batch 8]

Also times the model's matrix products alone at the same batch (the GEMM-only ceiling) and prints
the fraction of it lorafit reaches.

Ends with: RESULT tokens_per_s_ratio=X ceiling_fraction=F ceiling_tokens_per_s=C nll_lorafit=A
nll_peer=B (ratio is lorafit / peer; F is lorafit / C).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VALID = REPO.parent / "shared" / "data" / "pydocs" / "text" / "valid.jsonl"
SEQ_LEN = 512


def gemm_ceiling_tokens_per_s(model, tokens: int, dtype, repeats: int = 5) -> float:
    """Tokens/s if a forward pass were its weight matrix products alone: every Linear of the
    decoder and the output layer at `tokens` rows, in the compute dtype, each shape timed on its
    own (best of `repeats`) and counted as often as the model has it. Attention's own products,
    norms, activations and the loss's softmax are left out: this is the ceiling they eat into."""
    from collections import Counter

    import torch

    shapes = Counter(
        (module.in_features, module.out_features) for module in model.modules() if isinstance(module, torch.nn.Linear)
    )
    seconds = 0.0
    with torch.no_grad():
        for (inputs, outputs), count in shapes.items():
            x = torch.randn(tokens, inputs, dtype=dtype)
            weight = torch.randn(outputs, inputs, dtype=dtype)
            torch.nn.functional.linear(x, weight)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                began = time.perf_counter()
                torch.nn.functional.linear(x, weight)
                best = min(best, time.perf_counter() - began)
            seconds += best * count
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4, help="held-out pages scored")
    parser.add_argument("--batch", type=int, default=8, help="lorafit's evaluation batch (blocks)")
    parser.add_argument("--data", type=Path, default=DEFAULT_VALID)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file; pass --data with a JSONL of {{'text': ...}} records.")

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from lorafit.compute.objective import CausalLMObjective
    from lorafit.compute.perplexity import LossResult, evaluate_loss
    from lorafit.data.pack import PackedBlocks, pack_documents
    from lorafit.data.prepare import load_prepared_jsonl
    from lorafit.data.tokenize import tokenize_texts
    from lorafit.model.attention import use_block_causal_attention
    from lorafit.model.device import autocast_context, compute_dtype, resolve_precision
    from lorafit.model.embedded import embedded_model_folder
    from lorafit.model.load import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(""))
    documents, _ = load_prepared_jsonl([args.data])
    ids = tokenize_texts([d.text for d in documents[: args.documents]], tokenizer)
    blocks = pack_documents(ids, tokenizer.eos_token_id, SEQ_LEN, keep_tail=True)
    scored = int((blocks.full_labels()[:, 1:] != -100).sum())
    folder = embedded_model_folder()
    precision = resolve_precision("auto", torch.device("cpu"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; {len(blocks)} blocks of {SEQ_LEN}, "
        f"{scored:,} tokens scored; lorafit precision {precision}, batch {args.batch}",
        flush=True,
    )

    # The tutorial loop: batch 1, fp32, the model's own loss (a mean over the block's targets).
    peer_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dtype = compute_dtype(precision)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    if precision == "bf16":
        use_block_causal_attention(model)
    objective = CausalLMObjective(model, dtype)
    device = torch.device("cpu")

    def autocast():
        return autocast_context(precision, device)

    def peer_nll_of(rows: range) -> float:
        nll = 0.0
        with torch.no_grad():
            for row in rows:
                labels = torch.as_tensor(np.asarray(blocks.full_labels()[row : row + 1], dtype=np.int64))
                input_ids = torch.as_tensor(np.asarray(blocks.input_ids[row : row + 1], dtype=np.int64))
                targets = int((labels[:, 1:] != -100).sum())
                nll += float(peer_model(input_ids=input_ids, labels=labels).loss) * targets
        return nll

    # One warm-up each, then the two alternate batch by batch over the same blocks, so that a
    # machine that speeds up or slows down during the run (a shared host) affects both alike.
    peer_nll_of(range(1))
    evaluate_loss(objective, blocks.head(args.batch), args.batch, device, autocast)
    peer_nll = peer_seconds = ours_seconds = ours_nll = 0.0
    ours_tokens = 0
    for start in range(0, len(blocks), args.batch):
        rows = range(start, min(start + args.batch, len(blocks)))
        began = time.perf_counter()
        peer_nll += peer_nll_of(rows)
        peer_seconds += time.perf_counter() - began
        chunk = PackedBlocks(
            blocks.input_ids[start : rows.stop],
            None if blocks.labels is None else blocks.labels[start : rows.stop],
            None if blocks.position_ids is None else blocks.position_ids[start : rows.stop],
            blocks.members[start : rows.stop],
        )
        began = time.perf_counter()
        part = evaluate_loss(objective, chunk, args.batch, device, autocast)
        ours_seconds += time.perf_counter() - began
        ours_nll, ours_tokens = ours_nll + part.nll_sum, ours_tokens + part.tokens
    result = LossResult(nll_sum=ours_nll, tokens=ours_tokens)

    peer_tps, ours_tps = scored / peer_seconds, result.tokens / ours_seconds
    # Tokens pushed through the model (padding included) per second: what the ceiling is about.
    ceiling = gemm_ceiling_tokens_per_s(model, args.batch * SEQ_LEN, dtype)
    print(f"peer (batch 1, fp32): {peer_tps:,.0f} tokens/s, ppl {math.exp(peer_nll / scored):.4f}")
    print(f"lorafit ({precision}, batch {args.batch}): {ours_tps:,.0f} tokens/s, ppl {result.perplexity:.4f}")
    print(
        f"GEMM-only ceiling ({precision}, {args.batch} x {SEQ_LEN} tokens, every Linear and the output layer): "
        f"{ceiling:,.0f} tokens/s; lorafit reaches {ours_tps / ceiling:.1%} of it"
    )
    print(
        f"RESULT tokens_per_s_ratio={ours_tps / peer_tps:.3f} ceiling_fraction={ours_tps / ceiling:.3f} "
        f"ceiling_tokens_per_s={ceiling:.0f} nll_lorafit={result.loss:.4f} nll_peer={peer_nll / scored:.4f}"
    )


if __name__ == "__main__":
    main()

"""Check a GGUF export in a real llama.cpp runtime (llama-cpp-python) against transformers.

For held-out texts: the same token ids from both tokenizers, top-1 next-token agreement, the
largest logit difference and both perplexities; for a chat prompt rendered with the model's
template: the same greedy answer. Limits: f32/f16 logits within 0.1 with every top-1 agreeing;
bf16 and q8_0 perplexity within 1%; q4_k_m within 10% (a 4-bit model is a different model).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_TEXTS = [
    "A list is a mutable sequence. Lists may be constructed with a pair of square brackets, and "
    "list.append(x) adds an item to the end of the list.",
    "The with statement is used to wrap the execution of a block with methods defined by a context "
    "manager, so that common try/except/finally usage patterns can be encapsulated for reuse.",
    "Release 3.11.4 fixed 17 bugs.\n\n 1. The json module now decodes 1e400 as inf; 2. pathlib.Path "
    "globbing returns 12 matches in 0.5 seconds.",
]
CHAT_PROMPT = [{"role": "user", "content": "What does the Python len() function return?"}]
LOGIT_LIMIT = 0.1
PPL_LIMITS = {"bf16": 1.0, "q8_0": 1.0, "q4_k_m": 10.0}


def _llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    shifted = logits[:-1].astype(np.float64)
    peak = shifted.max(axis=1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(shifted - peak).sum(axis=1))
    targets = shifted[np.arange(len(ids) - 1), ids[1:]]
    return float((lse - targets).sum()), len(ids) - 1


def _greedy(llm, prompt_ids: list[int], eos: int, steps: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def verify_gguf(
    gguf_file: Path, hf_folder: Path, gguf_type: str, texts: list[str] | None = None, lora_file: Path | None = None
) -> dict:
    """Compare the GGUF model (with `lora_file` applied, if given) in llama.cpp with the
    transformers model in `hf_folder` (fp32)."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = texts or DEFAULT_TEXTS
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    llm = Llama(model_path=str(gguf_file), n_ctx=1024, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1)
    same_ids, agree, total, max_diff = True, 0, 0, 0.0
    nll_hf = nll_cpp = 0.0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same_ids &= llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        ours = _llama_cpp_logits(llm, ids)
        max_diff = max(max_diff, float(np.abs(reference - ours).max()))
        agree += int((reference.argmax(axis=1) == ours.argmax(axis=1)).sum())
        total += len(ids)
        for logits, is_hf in ((reference, True), (ours, False)):
            value, _ = _nll(logits, ids)
            if is_hf:
                nll_hf += value
            else:
                nll_cpp += value
    scored = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) - 1 for t in texts)
    ppl_hf, ppl_cpp = math.exp(nll_hf / scored), math.exp(nll_cpp / scored)
    ppl_diff = 100.0 * (ppl_cpp / ppl_hf - 1.0)

    chat_equal = None
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.tensor([prompt_ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )[0, len(prompt_ids) :].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        chat_equal = _greedy(llm, prompt_ids, tokenizer.eos_token_id, 24) == generated
        chat_answer = tokenizer.decode(generated, skip_special_tokens=True)
    if gguf_type in ("f32", "f16"):
        passed = same_ids and agree == total and max_diff <= LOGIT_LIMIT
    else:
        passed = same_ids and abs(ppl_diff) <= PPL_LIMITS[gguf_type]
    if chat_equal is not None and gguf_type in ("f32", "f16", "bf16", "q8_0"):
        passed = passed and chat_equal
    return {
        "texts": len(texts),
        "tokens": total,
        "token_ids_equal": same_ids,
        "top1_agreement": agree / total,
        "max_logit_diff": max_diff,
        "ppl_transformers": ppl_hf,
        "ppl_llama_cpp": ppl_cpp,
        "ppl_diff_percent": ppl_diff,
        "chat_answer_equal": chat_equal,
        "chat_answer": chat_answer if chat_equal is not None else None,
        "passed": passed,
    }

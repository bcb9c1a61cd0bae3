"""Check a GGUF export in a real llama.cpp runtime (llama-cpp-python) against transformers.

For held-out texts: the same token ids from both tokenizers, top-1 next-token agreement, the
largest logit difference and the perplexities; for a chat prompt rendered with the model's
template: the same greedy answer. Limits: f32/f16 logits within 0.1 of transformers running the
stored weights, every top-1 and the chat answer equal; bf16 and q8_0 perplexity within 1% of the
fp32 model and the same chat answer (llama.cpp rounds activations to bf16 in bf16 products, so
single logits move more); q4_k_m within 10% (a 4-bit model is a different model).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch

from lorafit.compute.generate import until_stop
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids
from lorafit.data.tokenize import pad_token_id

DEFAULT_TEXTS = [
    "A list is a mutable sequence. Lists may be constructed with a pair of square brackets, and "
    "list.append(x) adds an item to the end of the list.",
    "The with statement is used to wrap the execution of a block with methods defined by a context "
    "manager, so that common try/except/finally usage patterns can be encapsulated for reuse.",
    "Release 3.11.4 fixed 17 bugs.\n\n 1. The json module now decodes 1e400 as inf; 2. pathlib.Path "
    "globbing returns 12 matches in 0.5 seconds.",
]
GENERAL_TEXTS = 4  # more text for the perplexity comparison: passages of lorafit's general-English sample
PASSAGES_PER_TEXT = 10
CHAT_PROMPT = [{"role": "user", "content": "What does the Python len() function return?"}]
LOGIT_LIMIT = 0.1
PPL_LIMITS = {"bf16": 1.0, "q8_0": 1.0, "q4_k_m": 10.0}


def default_texts() -> list[str]:
    """The built-in check texts plus ~2,000 tokens of general English: enough tokens that a 1%
    perplexity limit measures the export, not the sampling noise of a few sentences."""
    import json

    from lorafit.data.datasets import GENERAL_SAMPLE_FILE

    lines = GENERAL_SAMPLE_FILE.read_text(encoding="utf-8").splitlines()[: GENERAL_TEXTS * PASSAGES_PER_TEXT]
    passages = [json.loads(line)["text"] for line in lines]
    chunks = ["\n\n".join(passages[i : i + PASSAGES_PER_TEXT]) for i in range(0, len(passages), PASSAGES_PER_TEXT)]
    return DEFAULT_TEXTS + chunks


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


def _greedy(llm, prompt_ids: list[int], stops: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


STORED_DTYPES = {"f16": torch.float16}


def _as_stored(model, dtype: torch.dtype | None):
    """The model with its matrices rounded as the GGUF file stores them (norms stay f32 there)."""
    if dtype is None:
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(param.to(dtype).float())
    return rounded


def sliding_window_beyond_gguf(config) -> int | None:
    """A sliding-attention window llama.cpp's layout for this model does not carry (Mistral's,
    exported as `llama`), else None."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", "") == "mistral" and window:
        return int(window)
    return None


def verify_gguf(
    gguf_file: Path, hf_folder: Path, gguf_type: str, texts: list[str] | None = None, lora_file: Path | None = None
) -> dict:
    """Compare the GGUF model (with `lora_file` applied, if given) in llama.cpp with the
    transformers model in `hf_folder`.

    f32/f16 are compared with transformers running the very weights the file stores (rounded to
    f16 for f16), which isolates the export — layout, rotary order, tokenizer,
    template — from the rounding; the rounding itself shows in `ppl_full_precision`, the perplexity
    of the unrounded fp32 model. Quantized types are compared with the fp32 model by perplexity."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Logits are compared on the check texts (a few hundred tokens: the largest difference over
    # many thousands of tokens measures f16 activation rounding in llama.cpp's kernels rather than
    # the export); perplexity on those plus ~1,500 tokens of general English.
    compared = len(texts) if texts else len(DEFAULT_TEXTS)
    texts = texts or default_texts()
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    full = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    exact = gguf_type in ("f32", "f16")
    model = _as_stored(full, STORED_DTYPES.get(gguf_type)) if exact else full
    context = min(1024, getattr(full.config, "max_position_embeddings", 1024))  # texts are cut to fit
    window = sliding_window_beyond_gguf(full.config)
    if window:  # llama.cpp attends over the whole context: the two agree up to the window
        context = min(context, window)
    llm = Llama(
        model_path=str(gguf_file),
        lora_path=None if lora_file is None else str(lora_file),
        n_ctx=context,
        logits_all=True,
        verbose=False,
        n_threads=os.cpu_count() or 1,
    )
    same_ids, agree, total, max_diff = True, 0, 0, 0.0
    nll = {"reference": 0.0, "llama_cpp": 0.0, "full": 0.0}
    scored = 0
    for number, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same_ids &= llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
        ids = ids[:context]
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            unrounded = reference if model is full else full(input_ids=torch.tensor([ids])).logits[0].numpy()
        ours = _llama_cpp_logits(llm, ids)
        if number < compared:
            max_diff = max(max_diff, float(np.abs(reference - ours).max()))
            agree += int((reference.argmax(axis=1) == ours.argmax(axis=1)).sum())
            total += len(ids)
        scored += len(ids) - 1
        for key, logits in (("reference", reference), ("llama_cpp", ours), ("full", unrounded)):
            nll[key] += _nll(logits, ids)[0]
    ppl = {key: math.exp(value / scored) for key, value in nll.items()}
    ppl_diff = 100.0 * (ppl["llama_cpp"] / ppl["full"] - 1.0)

    chat_equal, chat_answer = None, None
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stops = end_of_turn_ids(tokenizer, ChatTemplate(tokenizer.chat_template, "model"))
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.tensor([prompt_ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=pad_token_id(tokenizer),
            )[0, len(prompt_ids) :].tolist()
        generated = until_stop(generated, stops)
        chat_equal = _greedy(llm, prompt_ids, stops, 24) == generated
        chat_answer = tokenizer.decode(generated, skip_special_tokens=True)
    if exact:
        passed = same_ids and agree == total and max_diff <= LOGIT_LIMIT and chat_equal is not False
    else:
        passed = (
            same_ids and abs(ppl_diff) <= PPL_LIMITS[gguf_type] and (chat_equal is not False or gguf_type == "q4_k_m")
        )
    return {
        "texts": len(texts),
        "tokens": total,
        "ppl_tokens": scored,
        "reference": "fp32 model with the stored weights" if exact else "fp32 model",
        "token_ids_equal": same_ids,
        "top1_agreement": agree / total,
        "max_logit_diff": max_diff,
        "ppl_transformers": ppl["reference"],
        "ppl_llama_cpp": ppl["llama_cpp"],
        "ppl_full_precision": ppl["full"],
        "ppl_diff_percent": ppl_diff,
        "chat_answer_equal": chat_equal,
        "chat_answer": chat_answer,
        "passed": passed,
    }

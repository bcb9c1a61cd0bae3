"""`lorafit serve --engine vllm`: the same base and adapters through vLLM's own OpenAI server and
its LoRA support, on a GPU machine where vLLM is installed. lorafit checks what vLLM would get
wrong quietly (the faults users report), then hands the process over to vLLM:

- the rank limit is set from the adapters' largest rank (vLLM's `--max-lora-rank` defaults to 16
  and refuses bigger adapters at run time);
- adapters vLLM cannot apply as trained are refused by name: DoRA, and `modules_to_save`
  (vLLM's LoRA path drops them: the served adapter would answer differently);
- vLLM renders every model with one chat template: it is given the adapters' recorded template,
  and adapters trained with different templates are refused instead of being served with the
  wrong prompt format;
- adapters trained with `model.rope_scaling` get the same scaling on vLLM's base (`--hf-overrides`)
  and its context (`--max-model-len`): without it vLLM would serve them at the base's positions."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from lorafit.adapters.load import locate_trained, resolve_trained_base
from lorafit.errors import UsageError
from lorafit.integrity import read_json_file
from lorafit.model.rope import context_limit, with_rope_scaling


def vllm_command(
    adapters: dict[str, str],
    base: str | None,
    host: str,
    port: int,
    api_key: str | None,
    allow_base_mismatch: bool = False,
) -> list[str]:
    """The vLLM server's command line for these adapters, after lorafit's checks."""
    trained = {name: locate_trained(f"{name}={path}") for name, path in adapters.items()}
    ref, _ = resolve_trained_base(list(trained.values()), base, allow_base_mismatch)
    ranks, templates = [], set()
    for name, item in trained.items():
        if item.kind != "lora":
            raise UsageError(f"--adapter {name}: a fully fine-tuned model; serve it with --base.")
        config = read_json_file(item.path / "adapter_config.json")
        if config.get("use_dora"):
            raise UsageError(f"--adapter {name}: a DoRA adapter; vLLM cannot serve DoRA. Use --engine lorafit.")
        if config.get("modules_to_save"):
            raise UsageError(
                f"--adapter {name}: trains {', '.join(config['modules_to_save'])} whole (modules_to_save), which "
                "vLLM's LoRA path ignores; use --engine lorafit, or merge it (lorafit merge) and serve the merge."
            )
        ranks += [int(config.get("r", 8)), *[int(r) for r in (config.get("rank_pattern") or {}).values()]]
        if item.chat_template is not None:
            templates.add(item.chat_template.text)
    if len(templates) > 1:
        raise UsageError("the adapters were trained with different chat templates; vLLM serves one template.")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        ref.path,
        "--served-model-name",
        ref.name,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if trained:
        command += ["--enable-lora", "--max-loras", str(len(trained)), "--max-lora-rank", str(vllm_rank(max(ranks)))]
        command += ["--lora-modules", *[f"{name}={item.path}" for name, item in trained.items()]]
    if templates:
        command += ["--chat-template", templates.pop()]
    if ref.rope_scaling is not None:
        scaled = with_rope_scaling(read_json_file(Path(ref.path) / "config.json"), ref.rope_scaling)
        overrides = {key: scaled[key] for key in ("rope_parameters", "rope_scaling") if key in scaled}
        overrides["max_position_embeddings"] = scaled["max_position_embeddings"]
        command += ["--hf-overrides", json.dumps(overrides), "--max-model-len", str(context_limit(scaled))]
    if api_key:
        command += ["--api-key", api_key]
    return command


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_rank(rank: int) -> int:
    """The smallest rank limit vLLM accepts that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise UsageError(f"an adapter of rank {rank}: vLLM serves ranks up to {VLLM_RANKS[-1]}; use --engine lorafit.")


def serve_with_vllm(
    adapters: dict[str, str],
    base: str | None,
    host: str,
    port: int,
    api_key: str | None,
    allow_base_mismatch: bool = False,
) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--engine vllm: vLLM is not installed here (pip install vllm, on a machine with a GPU).")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--engine vllm needs a GPU; on this machine use --engine lorafit.")
    command = vllm_command(adapters, base, host, port, api_key, allow_base_mismatch)
    os.execv(command[0], command)

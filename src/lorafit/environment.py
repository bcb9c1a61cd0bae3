"""`lorafit env`: what this machine gives lorafit, in lines to paste into a bug report.

Package versions come from their installed metadata (nothing slow is imported to read them);
torch is imported for the CUDA devices and the precision `auto` would choose.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

CORE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf")
OPTIONAL_PACKAGES = ("bitsandbytes", "deepspeed", "flash-attn", "llama-cpp-python", "vllm")
TRACKER_PACKAGES = ("tensorboard", "wandb", "mlflow-skinny", "mlflow", "trackio")
CPU_FLAGS = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX512_BF16": "avx512_bf16", "AMX": "amx_tile"}


@dataclass
class Environment:
    lorafit: str
    python: str
    system: str
    packages: dict[str, str | None]  # name -> version, None when not installed
    cpu: str
    cpu_count: int
    torch_threads: int
    cpu_features: dict[str, bool]
    cuda: str  # torch's CUDA build, or why there is none
    gpus: list[dict] = field(default_factory=list)
    embedded_model: str = ""
    lorafit_home: str = ""
    precision_auto: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_description() -> tuple[str, dict[str, bool]]:
    """The CPU's model name and which of CPU_FLAGS it has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), {}
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return name or platform.machine(), {label: flag in flags for label, flag in CPU_FLAGS.items()}


def gpu_rows() -> tuple[str, list[dict]]:
    import torch

    if torch.version.cuda is None:
        return "torch built without CUDA", []
    if not torch.cuda.is_available():
        return f"CUDA {torch.version.cuda} build; no GPU visible", []
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,  # Ampere and later compute bf16 natively
                "fp16": (props.major, props.minor) >= (5, 3),
            }
        )
    return f"CUDA {torch.version.cuda}", rows


def embedded_model_state() -> str:
    from lorafit.errors import ModelError
    from lorafit.home import lorafit_home
    from lorafit.model.embedded import EMBEDDED_NAME, INSTALL_HINT, embedded_gguf_path, file_sha256

    try:
        gguf = embedded_gguf_path()
    except ModelError:
        return f"not installed ({INSTALL_HINT})"
    folder = lorafit_home() / "models" / f"{EMBEDDED_NAME}-{file_sha256(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return f"{EMBEDDED_NAME}: installed, converted and cached in {folder}"
    return f"{EMBEDDED_NAME}: installed ({gguf.name}); not converted yet (the first command using it converts it once)"


def describe_environment() -> Environment:
    import torch

    from lorafit import __version__
    from lorafit.home import lorafit_home
    from lorafit.model.device import default_device, resolve_precision

    cpu, features = cpu_description()
    cuda, gpus = gpu_rows()
    device = default_device()
    home_from = "$LORAFIT_HOME" if os.environ.get("LORAFIT_HOME") else "default; $LORAFIT_HOME unset"
    return Environment(
        lorafit=__version__,
        python=f"{platform.python_version()} ({platform.python_implementation()})",
        system=f"{platform.system()} {platform.release()} {platform.machine()}",
        packages={name: package_version(name) for name in CORE_PACKAGES + OPTIONAL_PACKAGES + TRACKER_PACKAGES},
        cpu=cpu,
        cpu_count=os.cpu_count() or 0,
        torch_threads=torch.get_num_threads(),
        cpu_features=features,
        cuda=cuda,
        gpus=gpus,
        embedded_model=embedded_model_state(),
        lorafit_home=f"{lorafit_home()} ({home_from})",
        precision_auto=f"{resolve_precision('auto', device)} on {device}",
    )


def _versions(env: Environment, names: tuple[str, ...]) -> str:
    return " · ".join(f"{name} {env.packages[name] or 'not installed'}" for name in names)


def environment_lines(env: Environment) -> list[str]:
    features = " · ".join(f"{label} {'yes' if has else 'no'}" for label, has in env.cpu_features.items())
    lines = [
        f"lorafit {env.lorafit} · python {env.python} · {env.system}",
        _versions(env, CORE_PACKAGES),
        f"CPU: {env.cpu} · {env.cpu_count} logical CPUs, torch uses {env.torch_threads} threads"
        + (f" · {features}" if features else ""),
        f"GPU: {env.cuda}",
    ]
    lines += [
        f"  cuda:{g['index']} {g['name']} · {g['memory_gib']} GiB · compute {g['capability']} · "
        f"bf16 {'yes' if g['bf16'] else 'no'} · fp16 {'yes' if g['fp16'] else 'no'}"
        for g in env.gpus
    ]
    lines += [
        "optional: " + _versions(env, OPTIONAL_PACKAGES),
        "trackers: " + _versions(env, TRACKER_PACKAGES),
        f"embedded model: {env.embedded_model}",
        f"LORAFIT_HOME: {env.lorafit_home}",
        f"precision auto here: {env.precision_auto}",
    ]
    return lines

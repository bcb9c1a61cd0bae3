"""`lorafit train --launcher accelerate`: the same command, started in N processes by `accelerate
launch` (torchrun underneath) with the engine named by --distributed. lorafit builds the launch
line and waits for it; it never starts or coordinates processes itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from lorafit.errors import UsageError

ENGINES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
# What accelerate launch is told for each engine (on one node; its own config file covers more).
ENGINE_FLAGS = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2"],
    "deepspeed-zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "deepspeed-zero3": ["--use_deepspeed", "--zero_stage", "3"],
}


def free_port() -> int:
    """A TCP port free on this machine now, for the processes' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(
    train_args: list[str],
    num_processes: int,
    engine: str = "ddp",
    config_file: Path | None = None,
    port: int | None = None,
) -> list[str]:
    """The `accelerate launch` line running `lorafit train <train_args>` in `num_processes`
    processes; `config_file` (an accelerate config, e.g. configs/distributed/) replaces the flags."""
    if engine not in ENGINES:
        raise UsageError(f"--distributed {engine}: use one of {', '.join(ENGINES)}.")
    if num_processes < 1:
        raise UsageError(f"--num-processes {num_processes}: give 1 or more.")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UsageError(f"--accelerate-config {config_file}: no such file; see configs/distributed/.")
        command += ["--config_file", str(config_file), "--num_processes", str(num_processes)]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += [*ENGINE_FLAGS[engine], "--num_processes", str(num_processes)]
        # One machine: a port free now, so two runs on one machine do not meet at the default port.
        command += ["--main_process_port", str(port or free_port())]
    return [*command, "-m", "lorafit.cli", "train", *train_args]


def launch(command: list[str]) -> int:
    """Run the launch line in the foreground until it ends; its exit status. Ctrl-C reaches every
    process of the terminal's group already (each finishes its step and checkpoints), so here it
    only waits; a SIGTERM sent to this process alone is passed on to the launcher, which passes it
    to the training processes."""
    env = dict(os.environ)
    # Each process gets its share of the cores instead of all of them (torchrun would pick 1).
    if "deepspeed" in " ".join(command) and not _has_accelerator():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo) where there is no GPU
    if "OMP_NUM_THREADS" not in env:
        processes = int(command[command.index("--num_processes") + 1])
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    process = subprocess.Popen(command, env=env)
    if threading.current_thread() is not threading.main_thread():
        return process.wait()
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM)),
    }
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()

"""Several processes through accelerate, on this CPU: DDP over gloo, and DeepSpeed ZeRO-2 on its
CPU accelerator. `lorafit train --launcher accelerate --num-processes 2` trains as one process
does with the same effective batch, each rank reading its own blocks, only the first writing; a
killed 2-process run resumes exactly, and only with 2 processes; the adapter is the ordinary PEFT
folder."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import make_corpus, write_config
from test_resume import lorafit, metrics, without_speed

from lorafit.compute.batches import BlockStream
from lorafit.training.launch import accelerate_command

TWO = ("--launcher", "accelerate", "--num-processes", "2")
ENGINES = ("ddp", "deepspeed-zero2")


def two_flags(engine: str) -> tuple[str, ...]:
    return (*TWO, "--distributed", engine)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One process of 2 blocks x 2 accumulation, and two processes of 1 block x 2 accumulation:
    4 blocks per step either way."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = make_corpus(tmp / "docs")
    settings = {"max_steps": 6, "save_every": 3, "eval_every": 3}
    one = write_config(tmp, tiny_model_dir, data, micro_batch_size=2, grad_accum=2, **settings).rename(tmp / "1.yaml")
    two = write_config(tmp, tiny_model_dir, data, micro_batch_size=1, grad_accum=2, **settings).rename(tmp / "2.yaml")
    single = lorafit("train", str(one), "--out", str(tmp / "single"))
    assert single.returncode == 0, single.stdout + single.stderr
    found = {"tmp": tmp, "two": two, "single": tmp / "single"}
    for engine in ENGINES:
        pair = lorafit("train", str(two), "--out", str(tmp / engine), *two_flags(engine))
        assert pair.returncode == 0, pair.stdout + pair.stderr
        found[engine], found[f"{engine} output"] = tmp / engine, pair.stdout
    return found


def test_each_rank_reads_its_own_part_of_the_same_global_batches():
    def micro_batches(rank: int, world: int, size: int) -> list[list[int]]:
        stream = BlockStream(num_blocks=10, batch_size=size, seed=3, rank=rank, world_size=world)
        return [stream.next_indices().tolist() for _ in range(7)]  # past an epoch's end

    single = micro_batches(0, 1, 4)
    ranks = [micro_batches(r, 2, 2) for r in range(2)]
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch  # disjoint halves of the one-process batch


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_as_one_process_with_the_same_effective_batch(runs, engine):
    output = " ".join(runs[f"{engine} output"].split())
    assert "1 blocks x 2 accumulation x 2 process(es) = 4 blocks per step" in output
    single, ddp = metrics(runs["single"]), metrics(runs[engine])
    assert [r.keys() for r in single] == [r.keys() for r in ddp]  # one line per step: only rank 0 writes
    for a, b in zip(single, ddp):
        for key in ("loss", "valid_loss", "grad_norm"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
        assert a.get("tokens") == b.get("tokens")
    a = load_file(str(runs["single"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[engine] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4) for k in a)
    summary = json.loads((runs[engine] / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["micro_batch_size"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_the_two_process_adapter_is_an_ordinary_peft_folder(runs, tiny_model_dir, engine):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single, ddp = runs["single"] / "adapter", runs[engine] / "adapter"
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in ddp.iterdir())

    def adapter_config(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set, in hash order
        return config

    assert adapter_config(single) == adapter_config(ddp)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ddp)
    weights = load_file(str(ddp / "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in weights.values())  # never ZeRO-3's empty placeholders
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_two_process_run_resumes_exactly_and_only_with_two(runs, engine):
    broken = runs["tmp"] / f"broken-{engine}"
    killed = lorafit("train", str(runs["two"]), "--out", str(broken), *two_flags(engine), fault="kill_after_step:4")
    assert killed.returncode != 0 and not (broken / "summary.json").exists()
    state = json.loads((broken / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["world_size"] == 2
    optimizer = torch.load(broken / "checkpoints" / "step-3" / "optimizer.pt", weights_only=False)
    # ZeRO partitions the optimizer state: the checkpoint holds every rank's part, DDP's is whole.
    assert isinstance(optimizer, list) == (engine != "ddp")
    assert len(optimizer) == 2  # two partitions, or the state and param_groups of one whole state

    alone = lorafit("train", str(runs["two"]), "--out", str(broken), "--resume")
    assert alone.returncode == 2
    assert "written by a run of 2 process(es), resumed with 1" in " ".join(alone.stdout.split())

    resumed = lorafit("train", str(runs["two"]), "--out", str(broken), "--resume", *two_flags(engine))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_speed(metrics(broken)) == without_speed(metrics(runs[engine]))
    a = load_file(str(runs[engine] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_launch_line_and_engines_not_yet_driven(tmp_path):
    command = accelerate_command(["run.yaml", "--out", "o"], 4, "ddp", port=29555)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[-5:] == ["lorafit.cli", "train", "run.yaml", "--out", "o"]
    assert command[command.index("--num_processes") + 1] == "4"
    shipped = Path(__file__).resolve().parents[1] / "configs" / "distributed" / "deepspeed-zero2.yaml"
    config = accelerate_command(["run.yaml"], 2, "ddp", config_file=shipped)
    assert "--config_file" in config and "--multi_gpu" not in config and "--main_process_port" not in config
    assert yaml.safe_load(shipped.read_text())["deepspeed_config"]["zero_stage"] == 2
    refused = lorafit("train", "run.yaml", "--launcher", "accelerate", "--distributed", "deepspeed-zero3")
    assert refused.returncode == 2 and "not supported by this lorafit yet" in refused.stdout


def test_sigterm_to_the_launching_command_stops_every_process_at_a_checkpoint(runs):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = runs["tmp"] / "stopped"
    command = [sys.executable, "-m", "lorafit.cli", "train", str(runs["two"]), "--out", str(out), *two_flags("ddp")]
    command += ["--set", "train.max_steps=2000"]
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_FAULT"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 180
    while not any('"loss"' in line for line in _lines(out / "metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # to the launching lorafit only, as a scheduler would
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "Continue exactly with" in " ".join(output.split())
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and json.loads((saved[-1] / "state.json").read_text())["world_size"] == 2


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []

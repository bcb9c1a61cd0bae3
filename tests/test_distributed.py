"""Several processes through accelerate, on this CPU: DDP and FSDP2 over gloo, DeepSpeed ZeRO-2
and ZeRO-3 on its CPU accelerator. `lorafit train --launcher accelerate --num-processes 2` trains
as one process does with the same effective batch, each rank reading its own blocks, only the
first writing; a killed 2-process run resumes exactly, and only with 2 processes and the same
engine; the adapter is the ordinary PEFT folder, gathered where the engine partitions the weights."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import make_corpus, write_config
from test_resume import lorafit, metrics, without_speed

from lorafit.compute.batches import BlockStream
from lorafit.config import RunConfig
from lorafit.errors import UsageError
from lorafit.training.engines import refuse_under_partitioned_weights
from lorafit.training.launch import accelerate_command

TWO = ("--launcher", "accelerate", "--num-processes", "2")
ENGINES = ("ddp", "deepspeed-zero2", "fsdp", "deepspeed-zero3")
PARTITIONED = ("fsdp", "deepspeed-zero3")  # the weights themselves in parts


def zero3_config(folder: Path) -> Path:
    """ZeRO-3 as the --distributed flag sets it, but partitioning every parameter: DeepSpeed keeps
    parameters below 100k elements whole on every rank, which would leave a tiny model unsharded."""
    settings = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    (folder / "zero3.json").write_text(json.dumps(settings))
    accelerate = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(folder / "zero3.json"), "zero3_init_flag": True},
        "num_machines": 1,
        "num_processes": 2,
        "use_cpu": False,
    }
    (folder / "zero3.yaml").write_text(yaml.safe_dump(accelerate))
    return folder / "zero3.yaml"


def two_flags(engine: str, folder: Path | None = None) -> tuple[str, ...]:
    if engine == "deepspeed-zero3" and folder is not None:
        return (*TWO, "--accelerate-config", str(zero3_config(folder)))
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
        pair = lorafit("train", str(two), "--out", str(tmp / engine), *two_flags(engine, tmp))
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


@pytest.mark.parametrize("engine", PARTITIONED)
def test_fsdp_and_zero3_hold_the_weights_in_parts(runs, engine):
    output = " ".join(runs[f"{engine} output"].split())
    held = re.search(r"this process holds ([\d,]+) of the ([\d,]+) parameters", output)
    assert held, output
    part, whole = (int(n.replace(",", "")) for n in held.groups())
    assert part < 0.6 * whole  # about half each (a few small tensors are padded or kept whole)
    # ZeRO-3 loads the base straight into its partitions: the report still counts every parameter.
    summaries = [json.loads((runs[name] / "summary.json").read_text()) for name in ("single", engine)]
    assert summaries[0]["trainable_parameters"] == summaries[1]["trainable_parameters"]


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


def test_under_zero_in_bf16_the_adapter_is_saved_from_deepspeeds_fp32_masters(runs):
    out = runs["tmp"] / "zero2-bf16"
    settings = ("--set", "train.precision=bf16", "--set", "train.max_steps=3")
    run = lorafit("train", str(runs["two"]), "--out", str(out), *two_flags("deepspeed-zero2"), *settings)
    assert run.returncode == 0, run.stdout + run.stderr
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # as one process keeps LoRA weights
    # DeepSpeed computes with bf16 copies of the weights; the trained values carry fp32's precision.
    assert any(not torch.equal(t, t.bfloat16().float()) for k, t in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_two_process_run_resumes_exactly_and_only_with_two(runs, engine):
    broken = runs["tmp"] / f"broken-{engine}"
    flags = two_flags(engine, runs["tmp"])
    killed = lorafit("train", str(runs["two"]), "--out", str(broken), *flags, fault="kill_after_step:4")
    assert killed.returncode != 0 and not (broken / "summary.json").exists()
    state = json.loads((broken / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["world_size"] == 2
    optimizer = torch.load(broken / "checkpoints" / "step-3" / "optimizer.pt", weights_only=False)
    # ZeRO partitions the optimizer state: the checkpoint holds every rank's part; DDP's and FSDP's
    # (gathered by parameter name) are whole.
    assert isinstance(optimizer, list) == engine.startswith("deepspeed")
    assert len(optimizer) == 2  # two partitions, or the state and param_groups of one whole state
    weights = load_file(str(broken / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, never a shard

    alone = lorafit("train", str(runs["two"]), "--out", str(broken), "--resume")
    assert alone.returncode == 2
    assert "written by a run of 2 process(es), resumed with 1" in " ".join(alone.stdout.split())
    if engine == "fsdp":
        other = lorafit("train", str(runs["two"]), "--out", str(broken), "--resume", *two_flags("ddp"))
        assert other.returncode != 0  # 2 from each process; torchrun's own status is 1
        assert "written under FSDP, resumed under one process or DDP" in " ".join(other.stdout.split())

    resumed = lorafit("train", str(runs["two"]), "--out", str(broken), "--resume", *two_flags(engine, runs["tmp"]))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_speed(metrics(broken)) == without_speed(metrics(runs[engine]))
    a = load_file(str(runs[engine] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_launch_line_and_the_shipped_configs(tmp_path):
    command = accelerate_command(["run.yaml", "--out", "o"], 4, "ddp", port=29555)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[-5:] == ["lorafit.cli", "train", "run.yaml", "--out", "o"]
    assert command[command.index("--num_processes") + 1] == "4"
    shipped = Path(__file__).resolve().parents[1] / "configs" / "distributed" / "deepspeed-zero2.yaml"
    config = accelerate_command(["run.yaml"], 2, "ddp", config_file=shipped)
    assert "--config_file" in config and "--multi_gpu" not in config and "--main_process_port" not in config
    assert yaml.safe_load(shipped.read_text())["deepspeed_config"]["zero_stage"] == 2
    for name, key, value in (
        ("deepspeed-zero3.yaml", "deepspeed_config", 3),
        ("deepspeed-zero3-offload.yaml", "deepspeed_config", 3),
        ("fsdp-1node.yaml", "fsdp_config", 2),
    ):
        config = yaml.safe_load((shipped.parent / name).read_text())
        assert config[key].get("zero_stage", config[key].get("fsdp_version")) == value
    fsdp = accelerate_command(["run.yaml"], 2, "fsdp", port=29556)
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_version") + 1] == "2"
    refused = lorafit("train", "run.yaml", "--launcher", "accelerate", "--distributed", "megatron")
    assert refused.returncode == 2 and "use one of ddp, fsdp, deepspeed-zero2, deepspeed-zero3" in refused.stdout


def test_what_fsdp_and_zero3_do_not_run_yet_is_refused_by_name(tiny_model_dir):
    base = {"model": {"base": str(tiny_model_dir)}, "data": {"train": ["docs"]}}
    refuse_under_partitioned_weights(RunConfig(**base), "fsdp")  # plain LoRA runs
    for section, key, value, named in (
        ("train", "method", "full", "train.method: full"),
        ("lora", "init", "pissa", "lora.init: pissa"),
        ("model", "quantization", "4bit", "model.quantization: 4bit"),
        ("data", "self_distill", True, "data.self_distill"),
        ("data", "replay_share", 0.2, "data.replay_share"),
    ):
        config = {**base, section: {**base.get(section, {}), key: value}}
        with pytest.raises(UsageError, match=named):
            refuse_under_partitioned_weights(RunConfig(**config), "deepspeed")


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

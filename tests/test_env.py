"""`lorafit env`: what it reports is what this machine has."""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path

import torch
from test_cli import invoke

from lorafit.environment import cpu_description
from lorafit.model.device import cpu_has_fast_bf16, default_device, resolve_precision


def test_env_json_reports_this_machine(isolated_home):
    result = invoke("env", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["packages"]["torch"] == metadata.version("torch")
    for name in ("transformers", "peft", "accelerate"):
        assert found["packages"][name] == metadata.version(name)
    assert (found["packages"]["bitsandbytes"] is None) == (importlib.util.find_spec("bitsandbytes") is None)
    assert found["precision_auto"] == f"{resolve_precision('auto', default_device())} on {default_device()}"
    assert found["lorafit_home"].startswith(str(isolated_home)) and "$LORAFIT_HOME" in found["lorafit_home"]
    assert found["torch_threads"] == torch.get_num_threads()
    if Path("/proc/cpuinfo").is_file():
        assert found["cpu_features"]["AVX512_BF16"] or found["cpu_features"]["AMX"] or not cpu_has_fast_bf16()
    assert (found["gpus"] == []) == (not torch.cuda.is_available())


def test_env_lines_are_plain_and_complete():
    result = invoke("env")
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in (
        "lorafit ",
        "torch ",
        "transformers ",
        "peft ",
        "accelerate ",
        "CPU: ",
        "GPU: ",
        "deepspeed ",
        "llama-cpp-python ",
        "embedded model: ",
        "LORAFIT_HOME: ",
        "precision auto here: ",
    ):
        assert needle in text
    assert "[" not in text.split("embedded model")[0]  # no rich markup left in the pasted lines


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    fake = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu avx2 avx512f amx_tile\n"
    real_read = Path.read_text
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: fake if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k)
    )
    name, features = cpu_description()
    assert name == "Example CPU 9000"
    assert features == {"AVX2": True, "AVX-512": True, "AVX512_BF16": False, "AMX": True}

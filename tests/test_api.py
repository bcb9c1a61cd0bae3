"""The Python API mirrors the command line: the same steps from a fresh `python -c`, the same
options and defaults (one source: the config sections), the same errors."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import pytest
from test_cli import make_corpus, write_config

import lorafit
from lorafit.errors import ConfigError, UsageError
from lorafit.options import default_of

NOTEBOOK = """
import json, sys
import lorafit
from lorafit.errors import UsageError

model, docs, config, work = sys.argv[1:5]
prepared = lorafit.prepare([docs], out=f"{work}/prepared", min_chars=50, base=model)
run = lorafit.train(config, out=f"{work}/run", overrides={"train.max_steps": 4, "train.lr": 1e-2})
report = lorafit.evaluate([f"{work}/run"], out=f"{work}/report", no_general=True, max_new_tokens=4)
merged = lorafit.merge(run.adapter, out=f"{work}/merged", dtype="f32")
session = lorafit.AdapterSession({"mine": f"{work}/run"})
answer = session.chat([{"role": "user", "content": "Python lists"}], max_new_tokens=3)
try:
    lorafit.train(config, out=f"{work}/run")
except UsageError as exc:
    refusal = str(exc)
print(json.dumps({
    "prepared": {k: str(v) for k, v in prepared.paths.items()},
    "summary": run.summary,
    "adapter": str(run.adapter),
    "report": str(run.report),
    "eval_models": [m["name"] for m in report.report["models"]],
    "merged": str(merged.out_dir),
    "answer": answer,
    "refusal": refusal,
}))
"""


def test_the_api_runs_every_step_from_a_fresh_python(tmp_path, tiny_model_dir):
    docs = make_corpus(tmp_path / "docs")
    config = write_config(tmp_path, tiny_model_dir, docs, max_steps=6, save_every=0)
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NOTEBOOK), str(tiny_model_dir), str(docs), str(config), str(work)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (work / "prepared" / "train.jsonl").is_file() and result["prepared"]["train"].endswith("train.jsonl")
    # .summary is summary.json; the overrides reached the run.
    assert result["summary"] == json.loads((work / "run" / "summary.json").read_text())
    assert result["summary"]["steps"] == 4
    assert result["adapter"] == str(work / "run" / "adapter") and result["report"] == str(work / "run" / "report.html")
    assert result["eval_models"] == ["base", "run"]
    assert (work / "merged" / "config.json").is_file()
    assert isinstance(result["answer"], str)
    assert "already holds a finished run" in result["refusal"]  # the CLI's refusal, word for word


def test_import_lorafit_loads_no_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, lorafit; print(lorafit.__version__, 'torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.split() == [lorafit.__version__, "False"]


def test_bad_overrides_and_options_raise_the_clis_errors(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, make_corpus(tmp_path / "docs"))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        lorafit.train(config, out=tmp_path / "run", overrides={"train.learning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"--near-dup-threshold 2\.0"):
        lorafit.prepare([tmp_path / "docs"], out=tmp_path / "prepared", near_dup_threshold=2.0)
    with pytest.raises(UsageError, match="--format onnx"):
        lorafit.export(tmp_path / "run", out=tmp_path / "x.gguf", format="onnx")
    with pytest.raises(UsageError, match="config: give a YAML path"):
        lorafit.train(42, out=tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "prepared").exists()


def test_a_config_given_as_a_dict_trains_like_its_yaml(tmp_path, tiny_model_dir):
    import yaml

    path = write_config(tmp_path, tiny_model_dir, make_corpus(tmp_path / "docs"), max_steps=2, save_every=0)
    raw = yaml.safe_load(path.read_text())
    raw["eval"]["report"] = False
    from_dict = lorafit.train(raw, out=tmp_path / "a", console=None)
    from_yaml = lorafit.train(path, out=tmp_path / "b", overrides=["eval.report=false"])
    assert from_dict.summary["valid_ppl_after"] == from_yaml.summary["valid_ppl_after"]
    assert from_dict.report is None and from_dict.adapter == tmp_path / "a" / "adapter"


def _defaults(function) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(function).parameters.items()}


@pytest.mark.parametrize(
    ("command", "keys"),
    [
        (
            "lorafit.cli.data_commands:prepare",
            {
                "text_field": "data.text_field",
                "min_chars": "data.min_chars",
                "near_dup_threshold": "data.near_dup_threshold",
                "valid_ratio": "data.valid_ratio",
                "exclude_ngram": "data.exclude_ngram",
                "base": "model.base",
            },
        ),
        (
            "lorafit.cli.eval_commands:evaluate_models",
            {
                "batch_size": "options.eval_batch_size",
                "generate_batch_size": "eval.batch_size",
                "max_blocks": "options.max_blocks",
                "task_max_examples": "eval.task_max_examples",
                "max_new_tokens": "eval.max_new_tokens",
                "task_max_new_tokens": "eval.task_max_new_tokens",
            },
        ),
    ],
)
def test_command_and_api_defaults_come_from_the_config_sections(command, keys):
    import importlib

    module, name = command.split(":")
    cli_defaults = _defaults(getattr(importlib.import_module(module), name))
    api_defaults = _defaults(lorafit.prepare if "prepare" in name else lorafit.evaluate)
    for option, key in keys.items():
        assert cli_defaults[option] == api_defaults[option] == default_of(key), option

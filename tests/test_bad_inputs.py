"""Bad input, odd input and faults, command by command: each gets one clear message naming the
file, option or field, an exit code, no traceback — and leaves every file it does not own as it was.

The table rows are (command line, expected exit code, words the message must hold). Paths in the
command lines are relative to a scratch folder holding a trained run and a few damaged artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import invoke, make_corpus, write_config

from lorafit.io import write_json_atomic
from lorafit.outputs import folder_lock


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run with two checkpoints (step-2, step-4), trained once for the module."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root, tiny_model_dir, make_corpus(root / "docs"), max_steps=4, save_every=2, eval_every=0)
    args = ["train", str(config), "--out", str(root / "run"), "--set", "eval.report=false"]
    result = invoke(*args, "--set", "eval.general=[]")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def work(tmp_path, trained, tiny_model_dir, monkeypatch) -> Path:
    """A scratch folder: run/ (a finished run), adapter/ (a PEFT folder lorafit saved), tiny/ (the
    base), docs/ and run.yaml, plus damaged copies and files of the user's own."""
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "docs", tmp_path / "docs")
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    shutil.copytree(tmp_path / "run" / "adapter", tmp_path / "adapter")
    config = write_config(tmp_path, tmp_path / "tiny", tmp_path / "docs", max_steps=2, save_every=0, eval_every=0)
    config.rename(tmp_path / "run.yaml")
    (tmp_path / "afile").write_text("the user's file\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's notes\n")
    damaged(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def damaged(root: Path) -> None:
    """Damaged artifacts, each with one fault."""
    cut = root / "cut-config"
    shutil.copytree(root / "adapter", cut)
    text = (cut / "adapter_config.json").read_text()
    (cut / "adapter_config.json").write_text(text[: len(text) // 2])
    short = root / "cut-weights"
    shutil.copytree(root / "adapter", short)
    with open(short / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    summary = root / "cut-summary"
    shutil.copytree(root / "run", summary)
    (summary / "summary.json").write_text((summary / "summary.json").read_text()[:40])
    (root / "garbage.gguf").write_bytes(os.urandom(2000))
    (root / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x02\x00")
    mismatch = root / "mismatch"
    shutil.copytree(root / "tiny", mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] *= 2
    (mismatch / "config.json").write_text(json.dumps(config))
    layers = root / "layers"
    shutil.copytree(root / "tiny", layers)
    config = json.loads((layers / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (layers / "config.json").write_text(json.dumps(config))
    (root / "bad.jsonl").write_text('{"text": "cut\n[1, 2]\n')
    (root / "empty.jsonl").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (root / "tasks.jsonl").write_text(
        json.dumps({"instruction": "What is a list?", "output": "A mutable sequence."})
        + "\n"
        + json.dumps({"instruction": "What is a tuple?", "output": ""})
        + "\n"
    )
    (root / "empty-prompts.txt").write_text("\n\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (but lorafit's cache) and a hash of its content."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "lorafit-home" not in path.parts:
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


ADAPTER = ["--adapter", "a=run"]
# (command line, exit code, words the message must hold); a refusal changes no file at all.
REFUSED = [
    # the two data-loss cases: saving or combining into a folder that holds a run or the user's files
    (["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "0.5,0.5", "--out", "run"], 2, ["holds a run"]),
    (["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "0.5,0.5", "--out", "mine"], 2, ["notes.txt"]),
    (["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1,1", "--out", "mine", "--overwrite"], 2, ["never"]),
    (
        ["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "nan,inf", "--out", "new"],
        2,
        ["--weights", "finite"],
    ),
    (["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1", "--out", "new"], 2, ["one per --adapter"]),
    (["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1,1", "--out", "afile"], 2, ["afile is a file"]),
    # 1. outputs that are files, existing folders, "."
    (["train", "run.yaml", "--out", "afile"], 2, ["afile is a file"]),
    (["train", "run.yaml", "--out", "."], 2, ["did not write", "afile"]),
    (["train", "run.yaml", "--out", "mine", "--overwrite"], 2, ["notes.txt", "never"]),
    (["train", "run.yaml", "--out", "run"], 2, ["finished run", "--overwrite"]),
    (["train", "run.yaml", "--out", "adapter"], 2, ["holds an adapter"]),
    (["train", "run.yaml", "--out", "afile/sub"], 2, ["afile is a file"]),
    (["eval", *ADAPTER, "--out", "afile"], 2, ["afile is a file"]),
    (["eval", *ADAPTER, "--out", "run"], 2, ["holds a run folder"]),
    (["eval", *ADAPTER, "--out", "."], 2, ["did not write"]),
    (["merge", "run", "--out", "mine", "--overwrite"], 2, ["notes.txt"]),
    (["merge", "run", "--out", "run"], 2, ["holds a run folder"]),
    (["merge", "run", "--out", "afile"], 2, ["afile is a file"]),
    (["export", "run", "--out", "afile", "--overwrite", "--no-verify"], 2, ["not written by lorafit"]),
    (["export", "run", "--out", "mine", "--no-verify"], 2, ["mine is a folder"]),
    (["prepare", "docs", "--out", "mine"], 2, ["notes.txt"]),
    (["prepare", "docs", "--out", "afile"], 2, ["afile is a file"]),
    (["prepare", "docs", "--out", "run", "--overwrite"], 2, ["holds a run folder"]),
    # 2. damaged artifacts
    (["eval", "--adapter", "cut-config", "--out", "new"], 2, ["cut-config/adapter_config.json", "invalid JSON"]),
    (["eval", "--adapter", "cut-weights", "--out", "new"], 2, ["adapter_model.safetensors", "truncated"]),
    (["merge", "cut-weights", "--out", "new"], 2, ["adapter_model.safetensors", "truncated"]),
    (["eval", "--adapter", "cut-summary", "--out", "new"], 2, ["cut-summary/summary.json", "invalid JSON"]),
    (["train", "docs", "--out", "new"], 2, ["docs is a folder", "YAML"]),
    (["export", "cut-config", "--out", "new.gguf", "--no-verify"], 2, ["adapter_config.json", "line"]),
    (
        ["combine", "--adapter", "cut-weights", "--adapter", "b=adapter", "--weights", "1,1", "--out", "n"],
        2,
        ["truncated"],
    ),
    (["train", "run.yaml", "--out", "new", "--set", "model.base=garbage.gguf"], 2, ["garbage.gguf", "not a GGUF"]),
    (["train", "run.yaml", "--out", "new", "--set", "model.base=short.gguf"], 2, ["short.gguf", "GGUF"]),
    (["train", "run.yaml", "--out", "new", "--set", "model.base=mismatch"], 2, ["mismatch", "other shapes"]),
    (["train", "run.yaml", "--out", "new", "--set", "model.base=layers"], 2, ["layers", "missing"]),
    (["eval", "--adapter", "run", "--base", "mismatch", "--out", "new", "--allow-base-mismatch"], 2, ["config.json"]),
    # 3. non-finite and out-of-range numbers
    (["train", "run.yaml", "--out", "new", "--set", "lora.alpha=.inf"], 2, ["lora.alpha", "finite"]),
    (["train", "run.yaml", "--out", "new", "--set", "train.lr=.nan"], 2, ["train.lr", "finite"]),
    (["train", "run.yaml", "--out", "new", "--set", "data.near_dup_threshold=2"], 2, ["data.near_dup_threshold"]),
    (["prepare", "docs", "--out", "new", "--near-dup-threshold", "2"], 2, ["--near-dup-threshold", "less than"]),
    (["prepare", "docs", "--out", "new", "--near-dup-threshold", "nan"], 2, ["--near-dup-threshold", "finite"]),
    (["prepare", "docs", "--out", "new", "--valid-ratio", "1.5"], 2, ["--valid-ratio"]),
    (["prepare", "docs", "--out", "new", "--min-chars", "-1"], 2, ["--min-chars"]),
    (["eval", *ADAPTER, "--out", "new", "--batch-size", "0"], 2, ["--batch-size"]),
    (["eval", *ADAPTER, "--out", "new", "--max-blocks", "-2"], 2, ["--max-blocks"]),
    (["eval", *ADAPTER, "--out", "new", "--seq-len", "2"], 2, ["--seq-len"]),
    (["eval", *ADAPTER, "--out", "new", "--precision", "fp8"], 2, ["--precision"]),
    (["merge", "run", "--out", "new", "--max-shard-mb", "0"], 2, ["--max-shard-mb"]),
    (["chat", *ADAPTER, "--max-new-tokens", "0"], 2, ["--max-new-tokens"]),
    # 4. everything rejected: the reasons shown, the fix named for the command that was run
    (["prepare", "latin1.txt", "--out", "new"], 2, ["latin1.txt", "not valid UTF-8"]),
    (["prepare", "docs", "--out", "new", "--min-chars", "100000"], 2, ["shorter than 100000", "lower --min-chars"]),
    (["train", "run.yaml", "--out", "new", "--set", "data.min_chars=100000"], 2, ["lower data.min_chars"]),
    (["train", "run.yaml", "--out", "new", "--set", "data.train=bad.jsonl"], 2, ["bad.jsonl:1", "invalid JSON"]),
    (["train", "run.yaml", "--out", "new", "--set", "data.train=empty.jsonl"], 2, ["empty.jsonl", "no records"]),
    (["eval", *ADAPTER, "--out", "new", "--prompts", "empty-prompts.txt"], 2, ["empty-prompts.txt", "no prompt"]),
]


def _case_id(case) -> str:
    return "-".join(case[0][:1] + [a for a in case[0][1:] if not a.startswith("--adapter")][:6])


@pytest.mark.parametrize(("args", "code", "words"), REFUSED, ids=[_case_id(c) for c in REFUSED])
def test_bad_input_is_refused_with_one_message_and_changes_nothing(work, args, code, words):
    before = snapshot(work)
    result = invoke(*args)
    flat = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    for word in words:
        assert word in flat, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert [line for line in result.output.splitlines() if line.startswith("error:")] != []
    assert snapshot(work) == before  # the command wrote, moved or deleted nothing
    assert not (work / "new").exists() and not (work / "n").exists()


def test_chat_save_never_replaces_a_run_folder_or_the_users_files(work, monkeypatch):
    before = snapshot(work)
    lines = iter(["/save a run", "/save a mine", "/save a afile", "/save a saved", "/save a saved", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    result = invoke("chat", *ADAPTER)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "/save run holds a run folder" in flat and "notes.txt" in flat and "afile is a file" in flat
    assert "/save saved already holds an adapter" in flat  # the second save into the same folder
    after = snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith("saved/")} == before
    assert (work / "saved" / "adapter_model.safetensors").is_file()


def test_overwrite_replaces_only_what_lorafit_wrote(work):
    assert invoke("combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1,1", "--out", "both").exit_code == 0
    (work / "both" / "my-notes.md").write_text("keep me\n")
    refused = invoke("combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1,0", "--out", "both")
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    args = ["combine", *ADAPTER, "--adapter", "b=adapter", "--weights", "1,0", "--out", "both", "--overwrite"]
    assert invoke(*args).exit_code == 0
    assert (work / "both" / "my-notes.md").read_text() == "keep me\n"
    combined = json.loads((work / "both" / "lorafit.json").read_text())
    assert combined["combined_from"]["weights"] == {"a": 1.0, "b": 0.0}
    # The same for a merge and a report.
    assert invoke("merge", "run", "--out", "merged", "--dtype", "f32").exit_code == 0
    (work / "merged" / "README.txt").write_text("mine\n")
    assert invoke("merge", "run", "--out", "merged").exit_code == 2
    assert invoke("merge", "run", "--out", "merged", "--overwrite").exit_code == 0
    assert (work / "merged" / "README.txt").read_text() == "mine\n"
    assert json.loads((work / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # A run folder and prepared data alike.
    (work / "run" / "my-notes.md").write_text("keep me\n")
    assert invoke("train", "run.yaml", "--out", "run", "--overwrite", "--set", "eval.report=false").exit_code == 0
    assert (work / "run" / "my-notes.md").read_text() == "keep me\n"
    assert not (work / "run" / "checkpoints").exists()  # the old run's, replaced by this one's (none)
    assert invoke("prepare", "docs", "--out", "prep", "--min-chars", "10").exit_code == 0
    (work / "prep" / "my-notes.md").write_text("keep me\n")
    assert invoke("prepare", "docs", "--out", "prep", "--min-chars", "10").exit_code == 2
    assert invoke("prepare", "docs", "--out", "prep", "--min-chars", "10", "--overwrite").exit_code == 0
    assert (work / "prep" / "my-notes.md").read_text() == "keep me\n"


def test_every_data_format_trains_with_the_default_general_text(work):
    """data.format describes the training files, never eval.general's shipped sample."""
    records = [{"instruction": f"Say {n} in words.", "output": f"The number {n}, spelled out."} for n in range(40)]
    chats = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in records
    ]
    shares = [
        {"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
        for r in records
    ]
    texts = [{"text": f"{r['instruction']} {r['output']} " * 4} for r in records]
    for fmt, rows in (("alpaca", records), ("chat", chats), ("sharegpt", shares), ("text", texts), ("auto", records)):
        data = work / f"{fmt}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        args = [
            "train",
            "run.yaml",
            "--out",
            f"fmt-{fmt}",
            "--set",
            f"data.format={fmt}",
            "--set",
            f"data.train={data}",
        ]
        result = invoke(*args, "--set", "train.max_steps=1", "--set", "eval.report=false", "--set", "train.seq_len=128")
        assert result.exit_code == 0, (fmt, result.output)
        summary = json.loads((work / f"fmt-{fmt}" / "summary.json").read_text())
        assert summary["general_ppl_before"] > 1  # measured on the shipped sample, as text


def test_skipped_task_records_are_reported_with_file_and_line(work):
    result = invoke("eval", *ADAPTER, "--tasks", "tasks.jsonl", "--out", "report", "--no-general", "--max-blocks", "2")
    assert result.exit_code == 0, result.output
    assert "tasks.jsonl:2: turn 2: the assistant answer is empty" in " ".join(result.output.split())
    report = json.loads((work / "report" / "report.json").read_text())
    assert [s["where"] for s in report["data"]["skipped"]] == ["tasks.jsonl:2"]
    assert json.loads((work / "report" / "tasks.json").read_text())["skipped"][0]["where"] == "tasks.jsonl:2"


def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_outputs_are_strict(tmp_path, work):
    write_json_atomic(tmp_path / "x.json", {"loss": float("nan"), "ppl": [float("inf"), 1.5]})
    assert strict_json(tmp_path / "x.json") == {"loss": None, "ppl": [None, 1.5]}
    for name in ("summary.json", "base_outputs.json", "checkpoints/step-4/state.json"):
        strict_json(work / "run" / name)
    for line in (work / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("damage", ["state.json", "optimizer.pt", "trainable.safetensors", "rng.pt"])
def test_resume_falls_back_from_a_damaged_checkpoint_saying_so(work, damage):
    (work / "run" / "summary.json").unlink()  # an interrupted run: checkpoints, no summary
    newest = work / "run" / "checkpoints" / "step-4" / damage
    with open(newest, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    config = work / "run" / "config.yaml"
    result = invoke("train", str(config), "--out", "run", "--resume", "latest")
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert f"step-4/{damage}" in flat and "using" in flat and "step-2" in flat
    assert "resuming from" in flat and "(step 2)" in flat
    assert "Traceback" not in result.output


def test_every_checkpoint_damaged_is_one_message(work):
    (work / "run" / "summary.json").unlink()
    for step in ("step-2", "step-4"):
        (work / "run" / "checkpoints" / step / "state.json").write_text("{")
    result = invoke("train", str(work / "run" / "config.yaml"), "--out", "run", "--resume", "latest")
    assert result.exit_code == 2 and "Every checkpoint is damaged" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("stage", ["int_at:base", "term_at:base"])
def test_interrupted_before_the_first_checkpoint_restarts_without_overwrite(work, monkeypatch, stage):
    monkeypatch.setenv("LORAFIT_FAULT", stage)
    stopped = invoke("train", "run.yaml", "--out", "fresh")
    assert stopped.exit_code == 130, stopped.output
    assert "before the first checkpoint" in " ".join(stopped.output.split())
    monkeypatch.delenv("LORAFIT_FAULT")
    assert invoke("train", "run.yaml", "--out", "fresh", "--resume", "latest").exit_code == 0  # starts over, saying so
    (work / "fresh" / "summary.json").unlink()
    shutil.rmtree(work / "fresh" / "adapter")
    monkeypatch.setenv("LORAFIT_FAULT", stage)
    assert invoke("train", "run.yaml", "--out", "fresh").exit_code == 130
    monkeypatch.delenv("LORAFIT_FAULT")
    rerun = invoke("train", "run.yaml", "--out", "fresh")
    assert rerun.exit_code == 0, rerun.output
    assert "starting over" in rerun.output


def test_interrupted_after_training_resumes_to_the_same_result(work, monkeypatch):
    args = ["train", "run.yaml", "--set", "eval.report=false", "--set", "train.eval_every=1"]
    assert invoke(*args, "--out", "straight").exit_code == 0
    monkeypatch.setenv("LORAFIT_FAULT", "int_at:finish")
    stopped = invoke(*args, "--out", "cut")
    assert stopped.exit_code == 130 and "--resume" in stopped.output
    assert not (work / "cut" / "adapter").exists() and (work / "cut" / "checkpoints" / "step-2").is_dir()
    monkeypatch.delenv("LORAFIT_FAULT")
    assert invoke(*args, "--out", "cut", "--resume", "latest").exit_code == 0
    straight = json.loads((work / "straight" / "summary.json").read_text())
    resumed = json.loads((work / "cut" / "summary.json").read_text())
    assert resumed["valid_ppl_after"] == pytest.approx(straight["valid_ppl_after"], rel=1e-6)

    def metrics(run: str) -> list[dict]:
        lines = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "tokens_per_second"} for line in lines]

    assert metrics("cut") == metrics("straight")  # the final validation is not logged twice


def test_a_second_process_on_the_same_folder_is_refused(work):
    with folder_lock(work / "busy", "lorafit train"):
        result = invoke("train", "run.yaml", "--out", "busy")
    assert result.exit_code == 2 and "in use by another lorafit process" in result.output
    assert f"pid {os.getpid()}" in result.output


def test_a_killed_process_leaves_no_lock_and_no_leftovers(work, tmp_path):
    """Two real processes: the second is refused while the first runs; after a SIGKILL the
    folder is usable at once (the kernel drops a dead process's lock)."""
    env = dict(os.environ)  # the first process trains "forever": it is still running when the second starts
    cmd = [
        sys.executable,
        "-m",
        "lorafit.cli",
        "train",
        "run.yaml",
        "--out",
        "shared",
        "--set",
        "train.max_steps=1000000",
    ]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (work / "shared" / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.5)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another lorafit process" in second.stdout, second.stdout
        assert f"pid {first.pid}" in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    stale = work / "shared" / "checkpoints"
    stale.mkdir(exist_ok=True)
    (stale / f".lorafit-tmp-{first.pid}-step-3-abc").mkdir()  # what a kill mid-checkpoint leaves
    third = invoke("train", "run.yaml", "--out", "shared", "--set", "train.save_every=1")
    assert third.exit_code == 0, third.output
    assert not [p for p in (work / "shared").rglob(".lorafit-tmp-*")]


def test_interrupted_merge_and_export_leave_nothing_half_written(work, monkeypatch):
    import lorafit.adapters.export as export
    import lorafit.adapters.merge as merge

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    stale = work / ".lorafit-tmp-999999999-out.gguf-partial"
    stale.write_bytes(b"left by a killed export")
    monkeypatch.setattr(export, "write_gguf", interrupt)
    result = invoke("export", "run", "--out", "out.gguf", "--no-verify", "--pre-tokenizer", "gpt-2")
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(merge, "merge_into_folder", interrupt)
    assert invoke("merge", "run", "--out", "merged").exit_code == 130
    assert not list(work.glob(".lorafit-*")) and not (work / "merged").exists() and not (work / "out.gguf").exists()


def test_export_replaces_only_its_own_file(work):
    first = invoke("export", "run", "--out", "out.gguf", "--no-verify", "--pre-tokenizer", "gpt-2")
    assert first.exit_code == 0, first.output
    assert invoke("export", "run", "--out", "out.gguf", "--no-verify", "--pre-tokenizer", "gpt-2").exit_code == 2
    assert (
        invoke("export", "run", "--out", "out.gguf", "--no-verify", "--pre-tokenizer", "gpt-2", "--overwrite").exit_code
        == 0
    )
    (work / "user.gguf").write_bytes((work / "garbage.gguf").read_bytes())
    (work / "user.Modelfile").write_text("FROM ./user.gguf\n")  # the user's own, beside a new name
    (work / "user.gguf").unlink()
    result = invoke("export", "run", "--out", "user.gguf", "--no-verify", "--overwrite", "--pre-tokenizer", "gpt-2")
    assert result.exit_code == 2 and "user.Modelfile" in result.output
    assert (work / "user.Modelfile").read_text() == "FROM ./user.gguf\n" and not (work / "user.gguf").exists()


def test_an_unexpected_error_is_one_line_without_traceback(work, monkeypatch):
    import lorafit.adapters.merge as merge

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(merge, "merge_into_folder", broken)
    result = invoke("merge", "run", "--out", "merged")
    assert result.exit_code == 1 and "ZeroDivisionError: a bug" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output

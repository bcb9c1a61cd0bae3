"""The evaluation report: `lorafit train` writes it, `lorafit eval` compares adapters in it, and
the HTML page renders in a real browser."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_cli import invoke, make_corpus, write_config

from lorafit.compute.perplexity import LossResult
from lorafit.evaluation.pages import render_html, render_markdown
from lorafit.evaluation.report import ModelEvaluation, build_report, read_curves

TASKS = [
    {"instruction": f"What does Python {topic} note {j} define?", "output": f"def f{j}(x): return x + {j}."}
    for j, topic in enumerate(["lists", "sets", "closures", "classes"])
]

# A second test set in another register: each eval.tasks file gets its own row ("transfer").
EXPLAINED = [
    {"instruction": f"Why would I use Python {topic}?", "output": f"Because {topic} keep related values together."}
    for topic in ["lists", "sets", "dicts"]
]


def train_run(tmp_path: Path, model_dir: Path, name: str, *overrides: str) -> Path:
    config = write_config(tmp_path, model_dir, make_corpus(tmp_path / "docs"))
    out = tmp_path / name
    args = ["train", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two adapters of the tiny model: different learning rates, so they differ measurably."""
    root = tmp_path_factory.mktemp("runs")
    tasks = write_jsonl(root / "tasks.jsonl", TASKS)
    explained = write_jsonl(root / "explained.jsonl", EXPLAINED)
    slow = train_run(root, tiny_model_dir, "slow", "train.lr=1e-3", f"eval.tasks=[{tasks}, {explained}]")
    fast = train_run(root, tiny_model_dir, "fast", "train.lr=2e-2", "train.max_steps=10")
    return {"slow": slow, "fast": fast, "tasks": tasks, "explained": explained}


def test_train_writes_the_report_by_default(two_runs):
    run = two_runs["slow"]
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    base, adapter = report["models"]
    assert (base["name"], base["kind"], adapter["kind"]) == ("base", "base", "lora")
    # The report holds what the run measured: validation = the domain, the shipped sample = general text.
    assert base["domain_ppl"] == pytest.approx(summary["valid_ppl_before"])
    assert adapter["domain_ppl"] == pytest.approx(summary["valid_ppl_after"])
    assert adapter["domain_ppl_change_percent"] == pytest.approx(summary["valid_ppl_change_percent"])
    assert base["general_ppl"] == pytest.approx(summary["general_ppl_before"])
    assert adapter["general_ppl"] == pytest.approx(summary["general_ppl_after"])
    assert "builtin" in report["data"]["general"]["files"][0]
    for model, side in ((base, "base"), (adapter, "adapter")):
        for key in ("rouge_l", "token_f1", "exact_match"):
            assert model["tasks"][key] == pytest.approx(summary["tasks"][side][key])
    # Each eval.tasks file scored on its own as well: the first is the run's own test set.
    own, other = str(two_runs["tasks"]), str(two_runs["explained"])
    assert [s["name"] for s in report["data"]["tasks"]["sets"]] == [own, other]
    assert report["data"]["tasks"]["records"] == len(TASKS) + len(EXPLAINED)
    for model, side in ((base, "base"), (adapter, "adapter")):
        assert model["tasks"]["count"] == len(TASKS) + len(EXPLAINED)
        assert model["task_sets"][own]["count"] == len(TASKS) and model["task_sets"][other]["count"] == len(EXPLAINED)
        assert model["task_sets"] == summary["task_sets"][side]
    assert adapter["task_sets_change"][other]["rouge_l"] == pytest.approx(
        adapter["task_sets"][other]["rouge_l"] - base["task_sets"][other]["rouge_l"]
    )
    assert report["transfer"]["own"] == own and report["transfer"]["others"] == [other]
    assert summary["transfer"]["own"] == own and summary["transfer"]["others"] == [other]
    tasks_json = json.loads((run / "tasks.json").read_text())
    assert tasks_json["sets"]["adapter"] == adapter["task_sets"]
    assert adapter["cost"]["trainable_parameters"] == summary["trainable_parameters"]["trainable"]
    assert adapter["cost"]["train_tokens"] == summary["train_tokens"] > 0
    steps = [step for step, _ in adapter["curves"]["train"]]
    assert steps == list(range(1, summary["steps"] + 1))
    assert [step for step, _ in adapter["curves"]["valid"]][0] == 0  # the base model's validation
    markdown = (run / "report.md").read_text()
    assert "| domain perplexity |" in markdown and "| base | adapter |" in markdown
    assert "## Transfer" in markdown and f"| {other} (transfer): ROUGE-L |" in markdown
    page = (run / "report.html").read_text()
    # loss curves, two perplexity bars, forgetting, and the adapter's change map (LoRA health)
    assert page.count("data:image/png;base64,") == 5
    assert "alt='LoRA change by layer and module type'" in page
    assert "src='http" not in page and 'src="http' not in page  # self-contained


def test_report_can_be_turned_off(tmp_path, tiny_model_dir):
    run = train_run(tmp_path, tiny_model_dir, "run", "eval.report=false", "eval.general=[]")
    assert not any((run / name).exists() for name in ("report.json", "report.md", "report.html"))
    assert "general_ppl_before" not in json.loads((run / "summary.json").read_text())


def test_eval_compares_adapters_on_the_same_data(two_runs, tmp_path):
    out = tmp_path / "report"
    result = invoke(
        "eval",
        "--adapter",
        str(two_runs["slow"]),
        "--adapter",
        f"quick={two_runs['fast'] / 'adapter'}",
        "--tasks",
        str(two_runs["tasks"]),
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "slow", "quick"]
    # Default domain = the first run's validation data, same blocks and precision as in training:
    # the base and the slow adapter measure exactly what the run measured.
    summary = json.loads((two_runs["slow"] / "summary.json").read_text())
    assert report["models"][0]["domain_ppl"] == pytest.approx(summary["valid_ppl_before"], rel=1e-5)
    assert report["models"][1]["domain_ppl"] == pytest.approx(summary["valid_ppl_after"], rel=1e-5)
    fast = json.loads((two_runs["fast"] / "summary.json").read_text())
    assert report["models"][2]["domain_ppl"] == pytest.approx(fast["valid_ppl_after"], rel=1e-5)
    assert report["models"][1]["domain_ppl"] != pytest.approx(report["models"][2]["domain_ppl"])
    for model in report["models"]:
        assert model["general_ppl"] > 1
        assert set(model["tasks"]) >= {"rouge_l", "token_f1", "exact_match", "bleu"}
        assert model["cost"]["eval_tokens_per_second"] > 0
    quick = report["models"][2]
    assert quick["domain_ppl_change_percent"] == pytest.approx(
        100 * (quick["domain_ppl"] / report["models"][0]["domain_ppl"] - 1)
    )
    assert quick["curves"]["train"] and quick["cost"]["train_tokens"] == fast["train_tokens"]
    # One generation per model for each prompt, sampled from the task records.
    assert report["generations"] and all(len(row["outputs"]) == 3 for row in report["generations"])
    answers = json.loads((out / "tasks.json").read_text())["answers"]
    assert len(answers) == len(TASKS) and set(answers[0]["answers"]) == {"base", "slow", "quick"}
    assert "| | base | slow | quick |" in (out / "report.md").read_text().replace("|  |", "| |")


def test_eval_takes_a_fully_fine_tuned_model_beside_an_adapter(two_runs, tiny_model_dir, tmp_path):
    full = train_run(tmp_path, tiny_model_dir, "full", "train.method=full", "train.lr=1e-3", "eval.general=[]")
    out = tmp_path / "report"
    result = invoke("eval", "--adapter", str(full), "--adapter", str(two_runs["fast"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [(m["name"], m["kind"]) for m in report["models"]] == [("base", "base"), ("full", "full"), ("fast", "lora")]
    summary = json.loads((full / "summary.json").read_text())
    assert report["models"][1]["domain_ppl"] == pytest.approx(summary["valid_ppl_after"], rel=1e-5)
    assert report["models"][1]["cost"]["trainable_parameters"] == summary["trainable_parameters"]["trainable"]


def test_eval_refuses_an_adapter_of_another_base(two_runs, tiny_model_dir, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rope_theta"] = 1234.0  # same shapes, other model: the adapter would load and mislead
    (other / "config.json").write_text(json.dumps(config))
    args = ["eval", "--adapter", str(two_runs["slow"]), "--base", str(other), "--out", str(tmp_path / "r")]
    refused = invoke(*args)
    assert refused.exit_code == 2
    assert "other-base" in refused.output and "--allow-base-mismatch" in refused.output
    assert not (tmp_path / "r").exists()
    forced = invoke(*args, "--allow-base-mismatch", "--max-blocks", "2", "--no-general")
    assert forced.exit_code == 0, forced.output


def test_eval_names_bad_input(two_runs, tmp_path):
    missing = invoke("eval", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert missing.exit_code == 2 and "no such folder" in missing.output
    twice = invoke("eval", "--adapter", str(two_runs["slow"]), "--adapter", str(two_runs["slow"]), "--out", "x")
    assert twice.exit_code == 2 and "NAME=PATH" in twice.output
    bad_tasks = write_jsonl(tmp_path / "bad.jsonl", [{"text": "plain text, no answers"}])
    result = invoke("eval", "--adapter", str(two_runs["slow"]), "--tasks", str(bad_tasks), "--out", "x")
    assert result.exit_code == 2 and "bad.jsonl" in result.output
    tasks = str(two_runs["tasks"])
    repeated = invoke("eval", "--adapter", str(two_runs["slow"]), "--tasks", tasks, "--tasks", tasks, "--out", "x")
    assert repeated.exit_code == 2 and "twice" in repeated.output and "--tasks" in repeated.output


def _evaluation(name, kind, domain_nll, general_nll, **extra) -> ModelEvaluation:
    return ModelEvaluation(
        name=name,
        kind=kind,
        domain=LossResult(nll_sum=domain_nll * 100, tokens=100),
        general=LossResult(nll_sum=general_nll * 100, tokens=100),
        **extra,
    )


def test_report_rows_changes_and_escaping():
    base = _evaluation("base", "base", 2.0, 3.0, tasks={"rouge_l": 0.1}, generations=["<b>base</b>"])
    tuned = _evaluation("law|v2", "lora", 1.5, 3.1, tasks={"rouge_l": 0.25}, generations=["<script>alert(1)</script>"])
    report = build_report([base, tuned], {"name": "tiny"}, {"domain": None}, ["What is <this>?"])
    entry = report["models"][1]
    assert entry["domain_ppl_change_percent"] == pytest.approx(100 * (2.718281828**1.5 / 2.718281828**2.0 - 1))
    assert entry["tasks_change"]["rouge_l"] == pytest.approx(0.15)
    assert report["models"][0]["domain_ppl_change_percent"] is None
    page = render_html(report, {})
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;this&gt;" in page
    assert "| law\\|v2 |" in render_markdown(report)
    with pytest.raises(ValueError):
        build_report([tuned], {}, {}, [])


def test_transfer_warns_when_the_own_test_set_gains_and_another_loses():
    sets = {"name": "docstrings.jsonl", "records": 4}, {"name": "faq.jsonl", "records": 2}
    data = {"domain": None, "tasks": {"files": [s["name"] for s in sets], "records": 6, "sets": list(sets)}}

    def model(name, kind, own, faq):
        return _evaluation(
            name, kind, 2.0, 3.0, tasks={"rouge_l": 0.2}, task_sets={"docstrings.jsonl": own, "faq.jsonl": faq}
        )

    base = model("base", "base", {"rouge_l": 0.14, "token_f1": 0.13}, {"rouge_l": 0.16, "token_f1": 0.21})
    copier = model("copier", "lora", {"rouge_l": 0.23, "token_f1": 0.22}, {"rouge_l": 0.12, "token_f1": 0.11})
    learner = model("learner", "lora", {"rouge_l": 0.20, "token_f1": 0.19}, {"rouge_l": 0.18, "token_f1": 0.22})
    report = build_report([base, copier, learner], {"name": "tiny"}, data, [])
    transfer = report["transfer"]
    assert transfer["own"] == "docstrings.jsonl" and transfer["others"] == ["faq.jsonl"]
    # Only the adapter that gains on its own set and loses on the other is warned about.
    assert len(transfer["warnings"]) == 1 and transfer["warnings"][0].startswith("copier beats the base")
    assert "faq.jsonl: ROUGE-L -0.040" in transfer["warnings"][0]
    assert report["models"][2]["task_sets_change"]["faq.jsonl"]["token_f1"] == pytest.approx(0.01)
    markdown = render_markdown(report)
    assert "**Warning:** copier beats the base" in markdown
    assert "| faq.jsonl (transfer): token F1 | 0.2100 | 0.1100 (-0.1000) | 0.2200 (+0.0100) |" in markdown
    assert "learner: transfer (task sets it was not trained in the style of): faq.jsonl ROUGE-L +0.020" in markdown
    assert 'id="transfer"' in render_html(report, {})
    # One task set: nothing to transfer to.
    data_one = {"domain": None, "tasks": {"files": ["a"], "records": 1, "sets": [{"name": "a", "records": 1}]}}
    assert build_report([base, copier], {}, data_one, [])["transfer"] is None


def test_curves_survive_a_cut_last_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = '{"step": 0, "valid_loss": 3.0}\n{"step": 1, "loss": 2.5}\n{"step": 2, "loss": null}\n{"step": 3, "lo'
    metrics.write_text(lines)
    assert read_curves(metrics) == {"train": [[1, 2.5]], "valid": [[0, 3.0]]}  # skipped step 2: a gap
    assert read_curves(tmp_path / "missing.jsonl") is None


CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, done: i.complete}));
  const tables = [...document.querySelectorAll('table')].map(t => ({
    id: t.id, rows: t.tBodies[0].rows.length, height: t.getBoundingClientRect().height,
    empty: [...t.querySelectorAll('td')].filter(c => !c.textContent.trim()).length}));
  const out = document.createElement('pre');
  out.id = 'lorafit-check';
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});
</script>
"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_report_renders_in_chromium(two_runs, tmp_path):
    page = (two_runs["slow"] / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    dom = subprocess.run(["chromium", *flags], capture_output=True, text=True, timeout=120).stdout
    marker = '<pre id="lorafit-check">'
    assert marker in dom, dom[-2000:]
    check = json.loads(dom.split(marker, 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    # Every plot decoded to a real image, and the tables laid out with every cell filled.
    assert len(check["images"]) == 5  # loss, two perplexity bars, forgetting, the LoRA change map
    assert all(img["done"] and img["w"] > 200 and img["h"] > 150 for img in check["images"])
    tables = {t["id"]: t for t in check["tables"]}
    assert tables["quality"]["rows"] >= 4 and tables["cost"]["rows"] == 7
    assert tables["transfer"]["rows"] >= 4  # two task sets x (ROUGE-L, token F1)
    assert all(t["height"] > 50 and t["empty"] == 0 for t in tables.values())

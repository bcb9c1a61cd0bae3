"""Which instruction-tuning recipe gains on the domain without copying the training set's register?

Each recipe of configs/recipes/ trains the embedded SmolLM2-135M-Instruct on the same seeded
sample of the pydocs docstring records (--records, so the self-distillation fits the CPU budget)
for --steps steps of 4 x 512 tokens, in its own `lorafit train` process, and is scored, base vs
adapter, on two task sets: the docstring test set (175 records of modules not trained on: the
training set's own register) and the Python FAQ development set (37 explanatory answers: the same
domain in another register). cpt-then-NAME chains two runs: continued pretraining on the pydocs
text (configs/recipes/cpt.yaml, --cpt-steps), then NAME.yaml started from that adapter
(lora.init_from), --steps minus --cpt-steps steps, so every recipe trains the same number of steps.

Per recipe: ROUGE-L and token F1 on each set, answer perplexity on each set's reference answers
(`lorafit eval --domain`, every adapter in one process), general-text perplexity change (forgetting:
lorafit's shipped general-English sample), training and wall time; and whether it meets issue 18's
bar: beats the base on the FAQ's ROUGE-L and token F1, keeps a gain on the docstring test set,
general perplexity within +5% of the base.

    .venv/bin/python bench/domain_gain.py [--recipes sft,self-distill,...] [--steps 40]
                                          [--records 600] [--work DIR] [--data ../shared/data]

Prints a Markdown table and one RESULT line per recipe (key=value, for scripts). A recipe whose
run folder already holds a summary.json is read, not trained again (--fresh to retrain).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RECIPES = ["sft", "self-distill", "replay", "self-distill-replay", "neftune", "gentle", "early-stop", "cpt-then-sft"]
GENERAL_LIMIT = 5.0  # percent: issue 18's bar for general-text perplexity


def lorafit(*args: str) -> None:
    command = [str(REPO / ".venv" / "bin" / "lorafit"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def sample_records(source: Path, count: int, out: Path) -> Path:
    """A seeded sample of the training records (the same for every recipe)."""
    lines = source.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    out.write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    return out


def train_recipe(name: str, args, work: Path, train: Path, tasks: list[Path]) -> Path:
    out = work / name
    if (out / "summary.json").is_file() and not args.fresh:
        return out
    common = ["--overwrite", "--set", f"eval.tasks=[{', '.join(map(str, tasks))}]", "--set", "eval.prompts=[]"]
    if name.startswith("cpt-then-"):  # continued pretraining, then the named recipe from its adapter
        stage_one = work / "cpt"
        text = args.data / "pydocs" / "text" / "train.jsonl"
        if not (stage_one / "summary.json").is_file() or args.fresh:
            lorafit(
                "train", "configs/recipes/cpt.yaml", "--out", str(stage_one), "--overwrite",
                "--set", f"data.train=[{text}]", "--set", f"train.max_steps={args.cpt_steps}",
            )  # fmt: skip
        lorafit(
            "train", f"configs/recipes/{name.removeprefix('cpt-then-')}.yaml", "--out", str(out), *common,
            "--set", f"data.train=[{train}]", "--set", f"train.max_steps={args.steps - args.cpt_steps}",
            "--set", f"lora.init_from={stage_one}",
        )  # fmt: skip
        return out
    lorafit(
        "train", f"configs/recipes/{name}.yaml", "--out", str(out), *common,
        "--set", f"data.train=[{train}]", "--set", f"train.max_steps={args.steps}",
    )  # fmt: skip
    return out


def answer_perplexities(runs: dict[str, Path], work: Path, domain: Path, label: str) -> dict[str, float]:
    """Perplexity of `domain`'s reference answers under the base and every adapter (one process)."""
    out = work / f"answer-ppl-{label}"
    done = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    if done and {m["name"] for m in done["models"]} == {"base", *runs}:
        return {model["name"]: model["domain_ppl"] for model in done["models"]}
    adapters = [item for name, run in runs.items() for item in ("--adapter", f"{name}={run}")]
    lorafit("eval", *adapters, "--domain", str(domain), "--no-general", "--max-new-tokens", "1", "--out", str(out),
            "--overwrite")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    return {model["name"]: model["domain_ppl"] for model in report["models"]}


def row(name: str, run: Path, tasks: list[Path], ppl: dict[str, dict[str, float]]) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    sets = summary["task_sets"]
    own, faq = (str(path) for path in tasks)
    figures = {"recipe": name, "steps": summary["steps"], "best_step": summary["best_step"]}
    for label, key in (("doc", own), ("faq", faq)):
        for metric in ("rouge_l", "token_f1"):
            figures[f"{label}_{metric}_base"] = sets["base"][key][metric]
            figures[f"{label}_{metric}"] = sets["adapter"][key][metric]
        figures[f"{label}_answer_ppl_base"] = ppl[label]["base"]
        figures[f"{label}_answer_ppl"] = ppl[label][name]
    low, high = paired_interval(run / "tasks.json", faq)
    figures["faq_rouge_l_gain_low"], figures["faq_rouge_l_gain_high"] = low, high
    figures["general_ppl_change_percent"] = summary["general_ppl_change_percent"]
    figures["train_seconds"] = summary["train_seconds"]
    figures["wall_seconds"] = summary["wall_seconds"]
    figures["meets_bar"] = (
        figures["faq_rouge_l"] > figures["faq_rouge_l_base"]
        and figures["faq_token_f1"] > figures["faq_token_f1_base"]
        and figures["doc_rouge_l"] > figures["doc_rouge_l_base"]
        and figures["doc_token_f1"] > figures["doc_token_f1_base"]
        and figures["general_ppl_change_percent"] <= GENERAL_LIMIT
    )
    return figures


def paired_interval(tasks_json: Path, task_file: str, draws: int = 2000) -> tuple[float, float]:
    """95% paired-bootstrap interval of the adapter's mean ROUGE-L gain over the base on one task
    file (37 FAQ questions make a small sample: a gain inside the noise shows as an interval around 0)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [r for r in json.loads(tasks_json.read_text())["answers"] if r["source"].startswith(task_file)]
    gains = [
        scorer.score(r["reference"], r["adapter"])["rougeL"].fmeasure
        - scorer.score(r["reference"], r["base"])["rougeL"].fmeasure
        for r in rows
    ]
    rng = random.Random(0)
    means = sorted(sum(rng.choice(gains) for _ in gains) / len(gains) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        "| recipe | docstrings ROUGE-L | docstrings token F1 | FAQ ROUGE-L (95% interval of the gain) | FAQ token F1 | "
        "docstring answer ppl | "
        "FAQ answer ppl | general ppl | train time | meets the bar |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| base | {first['doc_rouge_l_base']:.3f} | {first['doc_token_f1_base']:.3f} | "
        f"{first['faq_rouge_l_base']:.3f} | {first['faq_token_f1_base']:.3f} | {first['doc_answer_ppl_base']:.2f} | "
        f"{first['faq_answer_ppl_base']:.2f} | – | – | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['doc_rouge_l']:.3f} | {r['doc_token_f1']:.3f} | {r['faq_rouge_l']:.3f} "
            f"({r['faq_rouge_l_gain_low']:+.3f}…{r['faq_rouge_l_gain_high']:+.3f}) | "
            f"{r['faq_token_f1']:.3f} | {r['doc_answer_ppl']:.2f} | {r['faq_answer_ppl']:.2f} | "
            f"{r['general_ppl_change_percent']:+.1f}% | {r['train_seconds'] / 60:.1f} min | "
            f"{'yes' if r['meets_bar'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpt-steps", type=int, default=20)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorafit-domain-gain"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    args.data = args.data.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    train = sample_records(args.data / "pydocs" / "instruct" / "train.jsonl", args.records, args.work / "train.jsonl")
    tasks = [args.data / "pydocs" / "instruct" / "test.jsonl", args.data / "pyfaq" / "dev.jsonl"]
    started = time.perf_counter()
    runs = {}
    for name in args.recipes.split(","):
        began = time.perf_counter()
        runs[name] = train_recipe(name, args, args.work, train, tasks)
        print(f"{name}: {time.perf_counter() - began:.0f} s", flush=True)
    ppl = {
        "doc": answer_perplexities(runs, args.work, tasks[0], "doc"),
        "faq": answer_perplexities(runs, args.work, tasks[1], "faq"),
    }
    rows = [row(name, run, tasks, ppl) for name, run in runs.items()]
    print(f"\n{platform.processor() or platform.machine()}, {len(rows)} recipes, {args.steps} steps each, "
          f"{args.records} training records; {time.perf_counter() - started:.0f} s in all\n")  # fmt: skip
    print(markdown(rows))
    for r in rows:
        print("RESULT " + " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in r.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The instruction-tuning recipes that keep the model's own voice: self-distilled targets, replay of
the base model's answers, NEFTune noise, and early stopping on a task metric."""

import json
import math

import pytest
import torch
import yaml
from conftest import write_jsonl
from rich.console import Console
from test_cli import invoke

from lorafit.artifacts import RunFolder
from lorafit.compute.perplexity import LossResult
from lorafit.config import RunConfig
from lorafit.data.formats import Conversation
from lorafit.errors import ConfigError, DataError
from lorafit.training.base_answers import BaseAnswer, _read_cache
from lorafit.training.inputs import prepare_run_inputs
from lorafit.training.loop import LoopState, record_validation
from lorafit.training.neftune import add_embedding_noise
from lorafit.training.replay import read_replay_prompts
from lorafit.training.self_distill import REWRITE_REQUEST, self_distill, why_unusable

TRAIN = [
    {"instruction": f"What does helper {i} return?", "output": f"Return the index {i} of the item."} for i in range(12)
]


class ScriptedAnswerer:
    """Stands in for the base model where the test is about what lorafit does with its answers."""

    def __init__(self, answers: list[BaseAnswer]):
        self.answers, self.requests = answers, []

    def answer(self, conversations, max_new_tokens, what):
        self.requests.extend(conversations)
        return self.answers[: len(conversations)]


def chat(question: str, answer: str) -> Conversation:
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "t:1")


def test_self_distill_keeps_usable_rewrites_and_falls_back_to_the_reference():
    reference = "Return the number of items in a container."
    records = [chat(f"What does len {i} do?", reference) for i in range(5)]
    records.append(Conversation([{"role": "user", "content": "Pick."}], "t:9", choices=["a", "b"], answer=0))
    rewrite = "It gives you the number of items that a container holds, for example a list."
    answerer = ScriptedAnswerer(
        [
            BaseAnswer(rewrite, True),
            BaseAnswer(rewrite, False),  # cut at the length limit
            BaseAnswer("", True),
            BaseAnswer("the items the items the items the items the items the items the items", True),
            BaseAnswer("Paris is the capital of France and a lovely city to visit.", True),  # ignores the facts
        ]
    )
    out, stats = self_distill(records, answerer, 64)
    # The base model was shown the question and the reference; multiple-choice records are not asked.
    assert len(answerer.requests) == 5
    assert answerer.requests[0][-1]["content"] == REWRITE_REQUEST.format(
        question="What does len 0 do?", reference=reference
    )
    assert out[0].messages[-1]["content"] == rewrite and out[0].messages[0] == records[0].messages[0]
    assert [r.messages[-1]["content"] for r in out[1:5]] == [reference] * 4
    assert out[5] is records[5]
    assert stats == {"rewritten": 1, "kept": {"cut": 1, "empty": 1, "looping": 1, "off_reference": 1}}
    assert why_unusable(BaseAnswer(rewrite, True), reference) is None


def recipe_config(tmp_path, tiny_model_dir, **data) -> RunConfig:
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    return RunConfig.model_validate(
        {
            "model": {"base": str(tiny_model_dir)},
            "data": {"train": [str(train)], "valid_ratio": 0.2, "self_distill": False, "replay_share": 0.0, **data},
            "train": {"seq_len": 128, "precision": "fp32"},
            "eval": {"general": [], "batch_size": 4},
        }
    )


def prepare(config: RunConfig, tmp_path):
    return prepare_run_inputs(config, RunFolder(tmp_path / "run"), torch.device("cpu"), Console(), "fp32")


def cache_files(home):
    return sorted((home / "base-answers").glob("*.json"))


def script_cache(path, answer_for) -> None:
    """Replace every cached answer by answer_for(index), as a finished answer."""
    raw = json.loads(path.read_text())
    raw["answers"] = {key: [answer_for(i), True] for i, key in enumerate(sorted(raw["answers"]))}
    path.write_text(json.dumps(raw))


def decoded_training_text(inputs) -> str:
    return inputs.tokenizer.decode(inputs.blocks.train.input_ids.flatten().tolist())


def test_a_run_trains_on_the_base_models_rewrites_cached_per_prompt(tmp_path, tiny_model_dir, isolated_home):
    config = recipe_config(tmp_path, tiny_model_dir, self_distill=True, distill_max_new_tokens=6)
    first = prepare(config, tmp_path)
    # The tiny random model never ends its turn within 6 tokens: every reference is kept.
    training = first.documents.train_conversations
    assert first.blocks.stats["self_distill"] == {
        "rewritten": 0,
        "kept": {"cut": len(training), "empty": 0, "looping": 0, "off_reference": 0},
    }
    [cache] = cache_files(isolated_home)
    assert len(_read_cache(cache)) == len(training)
    # What a base model that answers would have said: the run trains on it, read from the cache.
    script_cache(cache, lambda i: f"Helper {i} gives a zero-based index.")
    second = prepare(config, tmp_path)
    assert second.blocks.stats["self_distill"]["rewritten"] == len(training)
    text = decoded_training_text(second)
    assert "gives a zero-based index" in text and "Return the index" not in text
    assert len(_read_cache(cache)) == len(training)  # nothing generated again
    # Validation keeps the reference answers: the run's answer perplexity stays about the data.
    assert all(c.messages[-1]["content"].startswith("Return the index") for c in second.documents.valid_conversations)


def test_replay_mixes_the_base_models_answers_to_general_prompts(tmp_path, tiny_model_dir, isolated_home):
    prompts = tmp_path / "general.txt"
    prompts.write_text("How do tides work?\n\nWhy is the sky blue?\nHow do I boil an egg?\n")
    plain = prepare(recipe_config(tmp_path, tiny_model_dir), tmp_path)
    config = recipe_config(
        tmp_path, tiny_model_dir, replay_share=0.5, replay_prompts=str(prompts), replay_max_new_tokens=4
    )
    with pytest.raises(DataError, match="none of the base model's 3 answers is usable"):
        prepare(config, tmp_path)  # the tiny model's answers are all cut at 4 tokens
    config.data.replay_share = "auto"  # the default goes on without replay, saying why
    assert "replay" not in prepare(config, tmp_path).blocks.stats
    config.data.replay_share = 0.5
    [cache] = cache_files(isolated_home)
    script_cache(cache, lambda i: f"A calm general answer number {i}.")
    inputs = prepare(config, tmp_path)
    natural = len(plain.blocks.train)
    assert inputs.blocks.stats["replay"] == {"prompts": 3, "answers": 3, "train_blocks": natural}
    assert len(inputs.blocks.train) == 2 * natural  # a share of 0.5: as many replay blocks as the data's
    assert "A calm general answer number" in decoded_training_text(inputs)
    replay_members = {inputs.blocks.sources[m] for block in inputs.blocks.train.members[natural:] for m in block}
    assert replay_members and all(source.startswith("replay:") for source in replay_members)


def test_recipes_name_what_they_need(tmp_path, tiny_model_dir):
    text = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": f"Python lists hold items in order, note {i}. " * 8} for i in range(6)]
    )
    config = recipe_config(tmp_path, tiny_model_dir, replay_share=0.2)
    config.data.train = [str(text)]
    with pytest.raises(DataError, match="data.replay_share reworks instruction data"):
        prepare(config, tmp_path)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"output": "no prompt"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: no 'instruction' or 'prompt'"):
        read_replay_prompts(str(bad))
    assert len(read_replay_prompts("builtin")) == 120
    with pytest.raises(ConfigError, match="early_stopping_metric: rouge_l is measured on eval.tasks"):
        from lorafit.config_files import build_config

        build_config({"data": {"train": ["x"]}, "train": {"early_stopping_metric": "rouge_l"}}, "run.yaml")


def test_neftune_noise_is_bounded_and_only_while_training(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 100, (2, 16))
    clean = model.get_input_embeddings()(ids)
    handle = add_embedding_noise(model, 5.0)
    model.train()
    noisy = model.get_input_embeddings()(ids)
    bound = 5.0 / math.sqrt(16 * clean.shape[-1])
    assert 0 < (noisy - clean).abs().max() <= bound
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    handle.remove()


def test_a_task_metric_chooses_the_weights_not_the_validation_loss():
    model = torch.nn.Linear(2, 2)
    state, logged = LoopState(), []
    # Step 1: the best loss and a mediocre answer score; step 2: worse loss, better answers.
    state.step = 1
    record_validation(state, model, LossResult(1.0, 1), 0, logged.append, ("rouge_l", 0.2))
    state.step = 2
    record_validation(state, model, LossResult(3.0, 1), 0, logged.append, ("rouge_l", 0.3))
    state.step = 3
    record_validation(state, model, LossResult(0.5, 1), 1, logged.append, ("rouge_l", 0.25))
    assert state.best_step == 2 and state.best_task_metric == 0.3 and state.stopped_early
    assert [line["task_rouge_l"] for line in logged] == [0.2, 0.3, 0.25]


def test_a_run_stops_on_rouge_l_over_every_task_file_with_neftune(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    own = write_jsonl(tmp_path / "own.jsonl", TRAIN[:3])
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": "Why use a helper?", "output": "To reuse code."}])
    config = {
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": [str(train)], "valid_ratio": 0.2},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "seq_len": 64,
            "micro_batch_size": 2,
            "lr": 5e-3,
            "max_steps": 4,
            "eval_every": 2,
            "precision": "fp32",
            "neftune_alpha": 5.0,
            "early_stopping_metric": "rouge_l",
            "early_stopping_examples": 2,
        },
        "eval": {"tasks": [str(own), str(other)], "task_max_new_tokens": 6, "general": [], "report": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("train", str(path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [(line["step"], line["task_rouge_l"]) for line in lines if "task_rouge_l" in line]
    assert [step for step, _ in checks] == [2, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(checks, key=lambda check: check[1])  # the first of equals
    assert summary["best_step"] == best[0]
    # The same run without the noise takes other steps (the noise reaches training), from the same start.
    config["train"]["neftune_alpha"] = 0.0
    path.write_text(yaml.safe_dump(config))
    assert invoke("train", str(path), "--out", str(tmp_path / "plain")).exit_code == 0
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert plain[0]["valid_loss"] == lines[0]["valid_loss"]  # the base, measured without noise
    first_step = [line["loss"] for line in lines if line.get("step") == 1 and "loss" in line]
    plain_first = [line["loss"] for line in plain if line.get("step") == 1 and "loss" in line]
    assert first_step != plain_first


def test_a_second_stage_starts_from_the_first_stages_adapter(tmp_path, tiny_model_dir):
    from test_cli import make_corpus, write_config

    docs = make_corpus(tmp_path / "docs")
    first = tmp_path / "first"
    config = write_config(tmp_path, tiny_model_dir, docs, save_every=0)
    assert invoke("train", str(config), "--out", str(first)).exit_code == 0
    # A learning rate too small to move the weights: the second stage ends where the first did,
    # while its "base" column is still the base model (the started adapter switched off).
    second = tmp_path / "second"
    args = ["train", str(config), "--out", str(second), "--set", f"lora.init_from={first}"]
    result = invoke(*args, "--set", "train.lr=1e-12", "--set", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    before, after = (json.loads((run / "summary.json").read_text()) for run in (first, second))
    assert after["valid_ppl_before"] == pytest.approx(before["valid_ppl_before"], rel=1e-6)
    assert after["valid_ppl_after"] == pytest.approx(before["valid_ppl_after"], rel=1e-5)
    assert after["valid_ppl_after"] != pytest.approx(after["valid_ppl_before"], rel=1e-3)
    wrong_rank = invoke(*args, "--set", "lora.r=8", "--out", str(tmp_path / "third"))
    assert wrong_rank.exit_code == 2 and "lora.init_from" in wrong_rank.output and "lora.r" in wrong_rank.output
    missing = invoke("train", str(config), "--out", str(tmp_path / "x"), "--set", f"lora.init_from={tmp_path}")
    assert missing.exit_code == 2 and "holds no adapter_model.safetensors" in missing.output


def test_the_base_is_measured_once_for_every_recipe_on_the_same_data(tmp_path, tiny_model_dir, isolated_home):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TRAIN[:3])
    config = {
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": [str(train)], "valid_ratio": 0.2},
        "lora": {"r": 4, "alpha": 8},
        "train": {"seq_len": 64, "micro_batch_size": 2, "lr": 5e-3, "max_steps": 2, "precision": "fp32"},
        "eval": {"tasks": [str(tasks)], "task_max_new_tokens": 6, "report": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    def run(name: str, *overrides: str):
        args = ["train", str(path), "--out", str(tmp_path / name)]
        for item in overrides:
            args += ["--set", item]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return result.output, summary

    first_output, first = run("first")
    assert "measured by an earlier run" not in first_output
    [kept] = sorted((isolated_home / "base-measurements").glob("*.json"))
    # Another recipe (rank, learning rate, noise) on the same data: the base is not measured again.
    output, other = run("other", "lora.r=8", "train.lr=1e-3", "train.neftune_alpha=5")
    assert "measured by an earlier run" in output and "scoring the base model" not in output
    for key in ("valid_ppl_before", "general_ppl_before"):
        assert other[key] == first[key]
    assert other["tasks"]["base"] == first["tasks"]["base"]
    base_outputs = json.loads((tmp_path / "other" / "base_outputs.json").read_text())
    assert base_outputs == json.loads((tmp_path / "first" / "base_outputs.json").read_text())
    # Other evaluation data, or a set-up that does not compute the base exactly: measured anew.
    assert "measured by an earlier run" not in run("fewer", "eval.task_max_examples=2")[0]
    assert "measured by an earlier run" not in run("dora", "lora.use_dora=true")[0]
    # A damaged entry is measured again and replaced, never trusted.
    kept.write_text('{"before": ')
    output, again = run("again")
    assert "measured by an earlier run" not in output and again["valid_ppl_before"] == first["valid_ppl_before"]
    assert json.loads(kept.read_text())["before"]["tokens"] > 0


def test_instruction_data_is_self_distilled_by_default_text_is_not(tmp_path, tiny_model_dir):
    config = recipe_config(tmp_path, tiny_model_dir, distill_max_new_tokens=4)
    config.data.self_distill = "auto"  # the default
    defaults = RunConfig.model_fields["data"].default_factory()
    assert defaults.self_distill == "auto" and defaults.replay_share == "auto"
    assert defaults.replay_share_for(True) == 0.2 and defaults.replay_share_for(False) == 0.0
    inputs = prepare(config, tmp_path)
    assert inputs.blocks.stats["self_distill"]["kept"]["cut"] == len(inputs.documents.train_conversations)
    text = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": f"Python lists hold items, note {i}. " * 8} for i in range(6)]
    )
    config.data.train = [str(text)]
    assert "self_distill" not in prepare(config, tmp_path).blocks.stats

"""Task metrics and multiple-choice scoring."""

import pytest
import torch

from lorafit.evaluation.metrics import answer_metrics, exact_match, normalize_answer, token_f1


def test_exact_match_and_token_f1_follow_squad_normalisation():
    assert normalize_answer("The  Answer, is: 42!") == "answer is 42"
    assert exact_match("the answer is 42.", "Answer is 42") == 1.0
    assert exact_match("42", "43") == 0.0
    # 2 shared tokens; precision 2/3, recall 2/4 -> F1 = 4/7.
    assert token_f1("returns sorted list", "return a new sorted list") == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_answer_metrics_use_rouge_l_and_corpus_bleu():
    perfect = answer_metrics(["Return the length of an object."], ["Return the length of an object."])
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["bleu"] == pytest.approx(100.0)
    assert perfect["exact_match"] == 1.0 and perfect["count"] == 1
    partial = answer_metrics(["Return the number of items."], ["Return the length of an object."])
    # LCS "return the of" (3 of 5 and 6 stemmed tokens): F = 2 * 0.6 * 0.5 / 1.1.
    assert partial["rouge_l"] == pytest.approx(2 * 0.6 * 0.5 / 1.1, abs=1e-6)
    assert 0.0 <= partial["bleu"] < 100.0
    assert answer_metrics([], [])["count"] == 0


def test_choice_log_likelihood_equals_scoring_the_full_sequence(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.evaluation.tasks import choice_log_likelihoods

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt, choices = "Which is mutable?", [" a list", " a tuple of numbers"]
    scores = choice_log_likelihoods(model, tokenizer, prompt, choices, torch.device("cpu"))
    for choice, score in zip(choices, scores):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        expected = sum(float(log_probs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(choice_ids))
        assert score == pytest.approx(expected, abs=1e-4)


def test_a_run_without_base_outputs_reports_the_tuned_side_only():
    from lorafit.config import EvalSection
    from lorafit.data.formats import Conversation
    from lorafit.training.records import generation_rows
    from lorafit.training.records import task_table as task_report

    records = [
        Conversation([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "t:1"),
        Conversation([{"role": "user", "content": "Pick."}], "t:2", choices=["x", "y"], answer=1),
    ]
    tuned = {
        "generations": ["hello"],
        "tasks": {"metrics": {"rouge_l": 1.0}, "answers": ["A."], "picks": [1]},
    }
    rows = generation_rows(["Q?"], ["<rendered>"], None, tuned)
    assert rows == [{"prompt": "Q?", "rendered_prompt": "<rendered>", "base": "", "adapter": "hello"}]
    report = task_report(records, None, tuned, EvalSection(tasks=["t"]))
    assert report["metrics"] == {"base": {}, "adapter": {"rouge_l": 1.0}}
    assert [(r["base"], r["adapter"]) for r in report["answers"]] == [("", "A."), ("", "y")]

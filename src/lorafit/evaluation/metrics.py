"""Answer-quality metrics: exact match and token F1 (SQuAD's definitions), ROUGE-L (rouge-score)
and corpus BLEU (sacrebleu). Every score is in [0, 1] except BLEU, which keeps sacrebleu's 0-100."""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Task metrics as the report names them.
TASK_METRICS = {
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "mc_accuracy": "multiple-choice accuracy",
}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L F-measure, and corpus BLEU, over paired answers."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions:
        return {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0, "bleu": 0.0, "count": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    count = len(predictions)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / count,
        "token_f1": sum(map(token_f1, predictions, references)) / count,
        "rouge_l": sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
        / count,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "count": count,
    }

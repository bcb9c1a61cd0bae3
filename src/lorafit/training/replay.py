"""Replay: the base model's own answers to general prompts, mixed into instruction tuning
(`data.replay_share` of the training blocks). What the domain data never asks keeps being
answered the way the model answered it before, so the adapter learns when the domain's register
applies instead of applying it everywhere. Answers are generated once and cached (`base_answers`)."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.data.formats import Conversation
from lorafit.errors import DataError
from lorafit.training.base_answers import BaseAnswerer
from lorafit.training.self_distill import why_unusable

BUILTIN_PROMPTS = "builtin"
BUILTIN_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "general_prompts.jsonl"


def read_replay_prompts(spec: str) -> list[str]:
    """data.replay_prompts: the shipped general questions, a JSONL file ('instruction' + optional
    'input', or 'prompt'), or a text file with one prompt per line."""
    path = BUILTIN_PROMPTS_FILE if spec == BUILTIN_PROMPTS else Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"data.replay_prompts: cannot read {path} ({exc}); name a JSONL or .txt file of prompts."
        ) from None
    if path.suffix.lower() not in (".jsonl", ".json"):
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [_record_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DataError(f"data.replay_prompts: {path} holds no prompt.")
    return prompts


def _record_prompt(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{number}: not JSON ({exc.msg}); data.replay_prompts takes one record per line."
        ) from None
    text = (record.get("instruction") or record.get("prompt")) if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{path}:{number}: no 'instruction' or 'prompt' text; data.replay_prompts needs one per record."
        )
    extra = record.get("input")
    return text.strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")


def replay_conversations(
    answerer: BaseAnswerer, prompts_spec: str, max_new_tokens: int
) -> tuple[list[Conversation], dict]:
    """The base model's usable answers to the replay prompts, as conversations (maybe none); statistics."""
    prompts = read_replay_prompts(prompts_spec)
    questions = [[{"role": "user", "content": prompt}] for prompt in prompts]
    answers = answerer.answer(questions, max_new_tokens, "replay")
    kept = [
        Conversation([*question, {"role": "assistant", "content": answer.text}], f"replay:{number}")
        for number, (question, answer) in enumerate(zip(questions, answers), 1)
        if why_unusable(answer, "") is None
    ]
    return kept, {"prompts": len(prompts), "answers": len(kept)}


def no_usable_replay(prompts: int) -> str:
    return (
        f"data.replay_prompts: none of the base model's {prompts} answers is usable (each was cut at "
        "data.replay_max_new_tokens, empty or looping); raise data.replay_max_new_tokens"
    )

"""The base model answering prompts before training, for the recipes that train on its own words
(self-distillation, replay). Answers are greedy, through the serving engine's continuous
batching, and cached per prompt under `$LORAFIT_HOME/base-answers/`, keyed by the base weights,
the chat template, the precision and the answer length: a second run (or a resumed one) reads
them back instead of generating, and an interrupted generation keeps every finished chunk."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.compute.generate import generation_mode, greedy_answers
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids, render_prompt
from lorafit.home import lorafit_home
from lorafit.io import write_json_atomic
from lorafit.model.attention import use_block_causal_attention
from lorafit.model.device import autocast_context, compute_dtype
from lorafit.model.load import BaseModelRef, load_causal_lm

CACHE_VERSION = 1
CHUNK = 64  # prompts generated between two cache writes


@dataclass(frozen=True)
class BaseAnswer:
    text: str
    finished: bool  # ended at the template's end of turn (False: cut at max_new_tokens)


@dataclass
class BaseAnswerer:
    """Loads the base model on first use (once for every recipe of a run) and answers prompts."""

    ref: BaseModelRef
    weights_fingerprint: str
    tokenizer: object
    template: ChatTemplate
    precision: str
    device: torch.device
    batch_size: int = 32
    report: Callable[[str], None] = lambda message: None
    _model: object = None

    def cache_file(self, max_new_tokens: int) -> Path:
        key = json.dumps(
            [CACHE_VERSION, self.weights_fingerprint, self.template.text, self.precision, max_new_tokens]
        ).encode()
        return lorafit_home() / "base-answers" / f"{hashlib.sha256(key).hexdigest()[:24]}.json"

    def answer(self, conversations: list[list[dict]], max_new_tokens: int, what: str) -> list[BaseAnswer]:
        """The base model's answer to the last user turn of each conversation, in order."""
        prompts = [render_prompt(self.tokenizer, self.template, messages) for messages in conversations]
        keys = [hashlib.sha256(prompt.encode()).hexdigest() for prompt in prompts]
        path = self.cache_file(max_new_tokens)
        cached = _read_cache(path)
        missing = sorted({key: prompt for key, prompt in zip(keys, prompts) if key not in cached}.items())
        if missing:
            cached_count = len(prompts) - len(missing)
            self.report(f"{what}: the base model answers {len(missing)} prompts ({cached_count} cached in {path})")
            for start in range(0, len(missing), CHUNK):
                chunk = missing[start : start + CHUNK]
                answers = self._generate([prompt for _, prompt in chunk], max_new_tokens)
                cached.update({key: [a.text, a.finished] for (key, _), a in zip(chunk, answers)})
                write_json_atomic(path, {"version": CACHE_VERSION, "answers": cached})
        return [BaseAnswer(*cached[key]) for key in keys]

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[BaseAnswer]:
        model = self._load()
        stops = end_of_turn_ids(self.tokenizer, self.template)
        autocast = functools.partial(autocast_context, self.precision, self.device)
        with generation_mode(model), torch.no_grad():
            answers = greedy_answers(
                model, self.tokenizer, prompts, max_new_tokens, self.device, autocast, self.batch_size, stops
            )
        return [BaseAnswer(text, finished) for text, finished in answers]

    def _load(self):
        if self._model is None:
            model = load_causal_lm(self.ref, compute_dtype(self.precision)).to(self.device)
            if self.device.type == "cpu" and self.precision == "bf16":
                use_block_causal_attention(model)
            model.requires_grad_(False)
            self._model = model
        return self._model

    def release(self) -> None:
        """Drop the model (training loads its own, with the adapter)."""
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _read_cache(path: Path) -> dict:
    """The cached answers (a damaged cache file is ignored: its answers are generated again)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        answers = raw["answers"] if raw.get("version") == CACHE_VERSION else {}
        return {k: v for k, v in answers.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}

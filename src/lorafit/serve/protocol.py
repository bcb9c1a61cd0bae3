"""The OpenAI wire format: request bodies as pydantic models (unknown fields ignored, as OpenAI's
own server ignores what it does not know), the range checks OpenAI answers with 400, and the
response and stream-chunk bodies the official `openai` client parses."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lorafit.serve.errors import APIError

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate to max_tokens (load tests); stop strings still apply

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self, max_n: int) -> None:
        """OpenAI's ranges; a value outside is the client's mistake (400, naming the field)."""
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise APIError(400, "temperature must be between 0 and 2.", param="temperature")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise APIError(400, "top_p must be greater than 0 and at most 1.", param="top_p")
        if not 1 <= self.n <= max_n:
            raise APIError(400, f"n must be between 1 and {max_n} on this server.", param="n")
        if len(self.stops) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} sequences.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if not self.messages:
            raise APIError(400, "messages must hold at least one message.", param="messages")
        if self.tools:
            raise APIError(400, "tools are not supported by this server.", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {type: text} is supported.", param="response_format")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")

    @property
    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for text completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server.", param="suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}.", param="logprobs")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt must not be empty.", param="prompt")

    @property
    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token-id lists (a list of them answers each in turn)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChoiceResult:
    """One choice of a finished request."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content}


def text_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def chat_response(id_: str, model: str, choices: list[ChoiceResult], usage_: dict, with_logprobs: bool) -> dict:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs) if with_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage_,
    }


def chat_chunk(id_: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_,
    }


def completion_response(id_: str, model: str, choices: list[dict], usage_: dict | None) -> dict:
    return {
        "id": id_,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_,
    }


def model_card(id_: str, created: int, parent: str | None, root: str | None) -> dict:
    return {"id": id_, "object": "model", "created": created, "owned_by": "lorafit", "parent": parent, "root": root}

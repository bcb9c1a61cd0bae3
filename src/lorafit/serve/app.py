"""`lorafit serve`'s HTTP surface: OpenAI's /v1/models, /v1/chat/completions and /v1/completions,
adapters loaded and removed at run time with the admin key, and /health."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lorafit.compute.sampling import Sampling
from lorafit.data.chat_template import RenderError, render_prompt
from lorafit.errors import UsageError
from lorafit.serve import protocol as wire
from lorafit.serve.errors import APIError, error_body, install_error_handlers, validation_error
from lorafit.serve.host import ModelHost, ServedModel
from lorafit.serve.runs import GenerationFailedError, RequestRun
from lorafit.serve.worker import QueueFullError, Worker

_ADAPTER_NAME = re.compile(r"^[\w.+-]{1,64}$")


@dataclass
class ServeLimits:
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # the most one choice may generate
    max_n: int = 8


def create_app(host: ModelHost, worker: Worker, limits: ServeLimits) -> FastAPI:
    app = FastAPI(title="lorafit", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": worker.running, "waiting": worker.waiting, "cancelled": worker.batcher.freed}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        check_api_key(request, limits)
        return {"object": "list", "data": [card(host, served) for served in list(host.served.values())]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        check_api_key(request, limits)
        return card(host, lookup(host, model_id))

    async def generation_request(request: Request, schema: type[wire.GenerationFields]):
        """The body of a completion request, checked, and the model it names."""
        check_api_key(request, limits)
        body = await read_body(request, schema, limits)
        body.check(limits.max_n)
        return body, lookup(host, body.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, served = await generation_request(request, wire.ChatCompletionRequest)
        try:
            text = render_prompt(host.tokenizer, served.template, [m.as_dict() for m in body.messages])
        except RenderError as exc:
            raise APIError(
                400, f"the conversation cannot be rendered by {served.id}'s chat template: {exc}", param="messages"
            ) from None
        prompt = host.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit, param = body.token_limit
        sampling = sampling_for(body, prompt, limit, param, served, host, limits)
        run = RequestRun(worker, served, prompt, sampling, body.n, body.stops)
        start(run)
        if body.stream:
            return sse(stream_chat(run, body, served))
        await finish(run, request)
        results = run.choice_results()
        return wire.chat_response(
            wire.completion_id("chatcmpl"),
            served.id,
            results,
            wire.usage(len(prompt), run.completion_tokens),
            body.logprobs,
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, served = await generation_request(request, wire.CompletionRequest)
        runs: list[tuple[RequestRun, str]] = []
        for number, item in enumerate(body.prompts()):
            text = item if isinstance(item, str) else host.tokenizer.decode(item)
            ids = host.tokenizer(item, add_special_tokens=False)["input_ids"] if isinstance(item, str) else item
            if any(not 0 <= token < host.vocab_size for token in ids):
                raise APIError(400, f"prompt: token ids must lie in [0, {host.vocab_size}).", param="prompt")
            sampling = sampling_for(body, ids, body.max_tokens, "max_tokens", served, host, limits)
            runs.append((RequestRun(worker, served, ids, sampling, body.n, body.stops, number * body.n), text))
        for run, _ in runs:
            start(run, [r for r, _ in runs])
        if body.stream:
            return sse(stream_completions(runs, body, served))
        choices, completion_tokens, prompt_tokens = [], 0, 0
        try:
            for run, _ in runs:
                await finish(run, request)
        finally:
            for run, _ in runs:
                run.cancel()
        for run, text in runs:
            prompt_tokens += len(run.prompt)
            completion_tokens += run.completion_tokens
            for result in run.choice_results():
                echo = text if body.echo else ""
                logprobs = wire.text_logprobs(result.logprobs, len(echo)) if body.logprobs is not None else None
                choices.append(
                    {
                        "index": result.index,
                        "text": echo + result.text,
                        "logprobs": logprobs,
                        "finish_reason": result.finish_reason,
                    }
                )
        return wire.completion_response(
            wire.completion_id("cmpl"), served.id, choices, wire.usage(prompt_tokens, completion_tokens)
        )

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        check_admin_key(request, limits)
        body = await read_body(request, wire.AdapterLoadRequest, limits)
        if not _ADAPTER_NAME.match(body.name):
            raise APIError(400, "name: use letters, digits and . _ + - (at most 64).", param="name")
        if body.name in host.served or body.name in worker.dropping:
            raise APIError(400, f"a model named '{body.name}' is already served; choose another name.", param="name")
        try:
            served = await asyncio.wrap_future(worker.call(lambda: host.load_runtime(body.name, body.path)))
        except UsageError as exc:
            raise APIError(400, str(exc), param="path", code="invalid_adapter") from None
        return card(host, served)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_admin_key(request, limits)
        try:
            await asyncio.wrap_future(worker.call(lambda: worker.retire_adapter(name)))
        except UsageError as exc:
            raise APIError(404, str(exc), param="name", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def card(host: ModelHost, served: ServedModel) -> dict:
    is_base = served.id == host.base_id
    root = host.ref.path if is_base else str(served.path)
    return wire.model_card(served.id, served.created, None if is_base else host.base_id, root)


def lookup(host: ModelHost, model_id: str) -> ServedModel:
    served = host.served.get(model_id)
    if served is None:
        raise APIError(
            404,
            f"The model '{model_id}' does not exist; GET /v1/models lists them.",
            param="model",
            code="model_not_found",
        )
    return served


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_api_key(request: Request, limits: ServeLimits) -> None:
    if limits.api_key is None:
        return
    given = bearer(request)
    if given is None or not (same(given, limits.api_key) or (limits.admin_key and same(given, limits.admin_key))):
        raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def check_admin_key(request: Request, limits: ServeLimits) -> None:
    given = bearer(request)
    if limits.admin_key is not None and given is not None and same(given, limits.admin_key):
        return
    if limits.api_key is not None and (given is None or not same(given, limits.api_key)):
        check_api_key(request, limits)  # no valid key at all: 401
    if limits.admin_key is None:
        raise APIError(403, "Adapter management is off: start the server with --admin-key.", code="forbidden")
    raise APIError(403, "Adapter management needs the admin key.", code="forbidden")


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def read_body(request: Request, schema: type[BaseModel], limits: ServeLimits):
    """The body parsed into `schema`: 413 past the size limit (by its header or as it arrives),
    400 if it is not JSON, 422 naming the first field of a wrong type."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise APIError(413, f"The request body is larger than {limits.max_body_bytes} bytes.")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"The request body is larger than {limits.max_body_bytes} bytes.")
    except ClientDisconnect:
        raise APIError(400, "The request body was cut off.") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def sampling_for(
    body, prompt: list[int], limit: int | None, param: str, served: ServedModel, host: ModelHost, limits: ServeLimits
) -> Sampling:
    """The request's sampling, its token budget checked against the context and the server's limit."""
    context = host.max_positions or (len(prompt) + limits.max_tokens)
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt")
    if len(prompt) >= context:
        raise APIError(
            400,
            f"The prompt is {len(prompt)} tokens; this model's context is {context}.",
            param="messages" if isinstance(body, wire.ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = context - len(prompt)
    if limit is not None:
        if limit < 1:
            raise APIError(400, f"{param} must be at least 1.", param=param)
        if limit > limits.max_tokens:
            raise APIError(400, f"{param} is limited to {limits.max_tokens} on this server.", param=param)
        if limit > room:
            raise APIError(
                400,
                f"The prompt ({len(prompt)} tokens) plus {param} ({limit}) exceed this model's context ({context}).",
                param=param,
                code="context_length_exceeded",
            )
    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(
        max_new_tokens=min(limit or limits.max_tokens, room),
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop_ids=() if body.ignore_eos else tuple(served.stop_ids),
        logprobs=body.logprobs_count,
    )


def start(run: RequestRun, together: list[RequestRun] | None = None) -> None:
    try:
        run.start()
    except QueueFullError:
        for other in together or []:
            other.cancel()
        raise APIError(
            429, "The server's queue is full; retry shortly.", code="rate_limit_exceeded", headers={"retry-after": "1"}
        ) from None


async def finish(run: RequestRun, request: Request) -> None:
    """Wait for every choice of a non-streamed request; a client that leaves frees its rows."""
    consume = asyncio.ensure_future(drain(run))
    try:
        while not consume.done():
            await asyncio.wait({consume}, timeout=0.5)
            if not consume.done() and await request.is_disconnected():
                run.cancel()
                consume.cancel()
                raise APIError(400, "The client disconnected.")
        try:
            consume.result()
        except GenerationFailedError as exc:
            raise APIError(500, str(exc)) from None
    finally:
        if not consume.done():
            consume.cancel()
        run.cancel()  # no-op once every choice has finished


async def drain(run: RequestRun) -> None:
    async for _ in run.deltas():
        pass


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def stream_chat(run: RequestRun, body, served: ServedModel) -> AsyncIterator[dict]:
    id_, created = wire.completion_id("chatcmpl"), int(time.time())
    try:
        first = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(body.n)
        ]
        yield wire.chat_chunk(id_, served.id, created, first)
        try:
            async for delta in run.deltas():
                logprobs = wire.chat_logprobs(delta.logprobs) if body.logprobs and delta.logprobs else None
                content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
                choice = {
                    "index": delta.index,
                    "delta": content,
                    "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                }
                yield wire.chat_chunk(id_, served.id, created, [choice])
        except GenerationFailedError as exc:
            yield error_body(500, str(exc))
            return
        if body.include_usage:
            yield wire.chat_chunk(id_, served.id, created, [], wire.usage(len(run.prompt), run.completion_tokens))
    finally:
        run.cancel()  # the client left mid-stream (or all ended): free the rows at once


async def stream_completions(runs, body, served: ServedModel) -> AsyncIterator[dict]:
    id_ = wire.completion_id("cmpl")
    offsets: dict[int, int] = {}
    try:
        for run, text in runs:
            if body.echo:
                for index in range(run.first_index, run.first_index + body.n):
                    offsets[index] = len(text)
                    yield wire.completion_response(
                        id_, served.id, [{"index": index, "text": text, "logprobs": None, "finish_reason": None}], None
                    )
            try:
                async for delta in run.deltas():
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = wire.text_logprobs(delta.logprobs, offsets.get(delta.index, 0))
                        offsets[delta.index] = offsets.get(delta.index, 0) + len(delta.text)
                    choice = {
                        "index": delta.index,
                        "text": delta.text,
                        "logprobs": logprobs,
                        "finish_reason": delta.finish_reason,
                    }
                    yield wire.completion_response(id_, served.id, [choice], None)
            except GenerationFailedError as exc:
                yield error_body(500, str(exc))
                return
        if body.include_usage:
            usage = wire.usage(sum(len(r.prompt) for r, _ in runs), sum(r.completion_tokens for r, _ in runs))
            yield wire.completion_response(id_, served.id, [], usage)
    finally:
        for run, _ in runs:
            run.cancel()

"""An OpenAI-compatible HTTP API over a loaded model: /v1/chat/completions, /v1/completions
(whole responses, or server-sent events with `stream`), /v1/models and /health.

Requests are validated before they reach the model; every client error is a 4xx response
with an OpenAI-shaped body ({"error": {"message", "type", "param", "code"}}), so the server
keeps serving. Generation runs on the scheduler's worker thread; the event loop only parses,
waits and streams.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from meshtron.infer.generation import Completion, SamplingParams
from meshtron.infer.loading import LoadedModel, encode_messages
from meshtron.infer.scheduler import Request, Scheduler


@dataclass
class ServerLimits:
    max_model_len: int  # prompt + generated tokens
    max_tokens: int  # the most a request may ask for (and the default when it asks for none)


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class _Sampling(BaseModel):
    """Fields both endpoints share. top_k and repetition_penalty extend the OpenAI API."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: dict | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)


def build_app(loaded: LoadedModel, model_name: str, limits: ServerLimits, max_batch_size: int = 8) -> FastAPI:
    from meshtron.infer.loading import pad_token_id

    scheduler = Scheduler(loaded.model, loaded.tokenizer, pad_token_id(loaded.tokenizer), max_batch_size)
    tokenizer = loaded.tokenizer
    created = int(time.time())
    app = FastAPI(title="meshtron", version="0.1.0")

    @app.exception_handler(ClientError)
    async def _client_error(_, e: ClientError):
        return _error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"invalid value for '{param}': {first['msg']}", param or None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "meshtron", "max_model_len": limits.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        _check_model(body.model, model_name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = encode_messages(tokenizer, messages)
        except ValueError as e:
            raise ClientError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        request = Request(prompt_ids, _params(body, max_tokens, len(prompt_ids), loaded, limits))
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", model_name, len(prompt_ids))
        if body.stream:
            return _sse(_stream_chat(scheduler, request, meta, _include_usage(body)))
        completion = await _complete(scheduler, request)
        message = {"role": "assistant", "content": completion.text}
        choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}
        return meta.body([choice], completion)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(body.model, model_name)
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        else:
            vocab_size = loaded.model.args.vocab_size
            if any(not 0 <= t < vocab_size for t in body.prompt):
                raise ClientError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
            prompt_ids = list(body.prompt)
        request = Request(prompt_ids, _params(body, body.max_tokens, len(prompt_ids), loaded, limits))
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", "text_completion", model_name, len(prompt_ids))
        if body.stream:
            return _sse(_stream_completion(scheduler, request, meta, _include_usage(body)))
        completion = await _complete(scheduler, request)
        choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}
        return meta.body([choice], completion)

    return app


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": status}})


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ClientError(404, f"model {requested!r} is not served here; this server serves {served!r}", "model")


def _include_usage(body: _Sampling) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _params(body: _Sampling, max_tokens: int | None, prompt_len: int, loaded: LoadedModel,
            limits: ServerLimits) -> SamplingParams:
    prompt_field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    room = limits.max_model_len - prompt_len
    if room <= 0:
        raise ClientError(400, f"the prompt has {prompt_len} tokens, but this model's context is "
                               f"{limits.max_model_len} tokens; shorten the prompt", prompt_field)
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, room)
    elif max_tokens > limits.max_tokens:
        raise ClientError(400, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens}",
                          "max_tokens")
    elif max_tokens > room:
        raise ClientError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this "
                               f"model's context of {limits.max_model_len} tokens; lower max_tokens or shorten "
                               "the prompt", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, stop_token_ids=loaded.stop_token_ids,
            stop_strings=tuple(stop), seed=body.seed,
        )
    except ValueError as e:
        raise ClientError(400, str(e)) from None


@dataclass
class _Meta:
    id: str
    object: str
    model: str
    prompt_tokens: int

    def head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": int(time.time()), "model": self.model}

    def usage(self, completion: Completion) -> dict:
        n = len(completion.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def body(self, choices: list[dict], completion: Completion) -> dict:
        return {**self.head(), "choices": choices, "usage": self.usage(completion)}


async def _complete(scheduler: Scheduler, request: Request) -> Completion:
    try:
        return await asyncio.wrap_future(scheduler.submit(request))
    except asyncio.CancelledError:  # the client disconnected: stop generating for it
        request.cancelled.set()
        raise


async def _chunks(scheduler: Scheduler, request: Request) -> AsyncIterator[str | Completion]:
    """Text chunks as the worker produces them, then the finished Completion."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()
    request.on_text = lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, chunk)
    future = scheduler.submit(request)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(chunks.put_nowait, None))
    try:
        while (chunk := await chunks.get()) is not None:
            yield chunk
        yield future.result()
    finally:
        # Reached early when the client disconnects and the response stops reading this stream.
        if not future.done():
            request.cancelled.set()


async def _stream_chat(scheduler, request, meta: _Meta, include_usage: bool) -> AsyncIterator[dict]:
    head = {**meta.head(), "object": "chat.completion.chunk"}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for item in _chunks(scheduler, request):
        if isinstance(item, str):
            yield {**head, "choices": [{"index": 0, "delta": {"content": item}, "finish_reason": None}]}
        else:
            yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason}]}
            if include_usage:
                yield {**head, "choices": [], "usage": meta.usage(item)}


async def _stream_completion(scheduler, request, meta: _Meta, include_usage: bool) -> AsyncIterator[dict]:
    head = meta.head()
    async for item in _chunks(scheduler, request):
        if isinstance(item, str):
            yield {**head, "choices": [{"index": 0, "text": item, "finish_reason": None, "logprobs": None}]}
        else:
            yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": item.finish_reason,
                                        "logprobs": None}]}
            if include_usage:
                yield {**head, "choices": [], "usage": meta.usage(item)}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

"""An OpenAI-compatible HTTP API over a loaded model: /v1/chat/completions, /v1/completions
(whole responses, or server-sent events with `stream`, with `logprobs` as OpenAI defines them),
/v1/models, /health and /metrics (Prometheus text).

Requests are validated before they reach the model; every client error is a 4xx response
with an OpenAI-shaped body ({"error": {"message", "type", "param", "code"}}), so the server
keeps serving. A request field the server does not implement is refused (400 naming it), never
silently ignored. With an API key, every /v1 request needs it as a bearer token. Generation runs
on the scheduler's worker thread; the event loop only parses, waits and streams.
"""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from meshtron.infer.generation import Completion, SamplingParams, TokenLogprob
from meshtron.infer.loading import LoadedModel, encode_messages
from meshtron.infer.scheduler import Request, Scheduler


@dataclass
class ServerLimits:
    max_model_len: int  # prompt + generated tokens
    max_tokens: int  # the most a request may ask for (and the default when it asks for none)


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# OpenAI fields this server does not implement, accepted only at the value that changes nothing.
_NO_OP_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "echo": False, "best_of": 1}
MAX_TOP_LOGPROBS = 20


class _Sampling(BaseModel):
    """Fields both endpoints share. top_k and repetition_penalty extend the OpenAI API. Other
    fields are kept (extra="allow") so that the endpoint can refuse them by name."""

    model_config = ConfigDict(extra="allow")
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
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ClientError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def num_logprobs(self) -> int | None:
        return self.logprobs


def build_app(loaded: LoadedModel, model_name: str, limits: ServerLimits, scheduler: Scheduler,
              api_key: str | None = None) -> FastAPI:
    """The app over `scheduler` (see `make_scheduler`); the scheduler closes when the server shuts down."""
    tokenizer = loaded.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_):
        yield
        # After the last response: under tensor parallel this also ends the other ranks.
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="meshtron", version="0.1.0", lifespan=lifespan)

    def authorize(authorization: str = Header(default="")) -> None:
        """With an API key, every /v1 request must carry it as a bearer token (checked before the body)."""
        # Constant time, so that response timing does not reveal how much of a guess was right.
        if api_key is not None and not hmac.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
            raise ClientError(401, "missing or incorrect API key; send it as the header 'Authorization: Bearer KEY'",
                              code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.exception_handler(ClientError)
    async def _client_error(_, e: ClientError):
        return _error(e.status, e.message, e.param, e.code)

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

    @app.get("/metrics")
    async def metrics():
        """Prometheus text: running and waiting requests, tokens/s while generating, time to first token."""
        lines = [f"meshtron_{name} {value}" for name, value in scheduler.stats.snapshot().items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "meshtron", "max_model_len": limits.max_model_len}]}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        _check_request(body, model_name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = encode_messages(tokenizer, messages)
        except ValueError as e:
            raise ClientError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        request = Request(prompt_ids, _params(body, max_tokens, len(prompt_ids), loaded, limits))
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", model_name, len(prompt_ids),
                     _LogprobFormat(tokenizer, chat=True) if body.logprobs else None)
        if body.stream:
            return _sse(_stream_chat(scheduler, request, meta, _include_usage(body)))
        completion = await _complete(scheduler, request)
        message = {"role": "assistant", "content": completion.text}
        choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason,
                  "logprobs": meta.logprobs(completion.logprobs)}
        return meta.body([choice], completion)

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        _check_request(body, model_name)
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        else:
            vocab_size = loaded.model.args.vocab_size
            if any(not 0 <= t < vocab_size for t in body.prompt):
                raise ClientError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
            prompt_ids = list(body.prompt)
        request = Request(prompt_ids, _params(body, body.max_tokens, len(prompt_ids), loaded, limits))
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", "text_completion", model_name, len(prompt_ids),
                     _LogprobFormat(tokenizer, chat=False) if body.logprobs is not None else None)
        if body.stream:
            return _sse(_stream_completion(scheduler, request, meta, _include_usage(body)))
        completion = await _complete(scheduler, request)
        choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                  "logprobs": meta.logprobs(completion.logprobs)}
        return meta.body([choice], completion)

    app.include_router(v1)
    return app


def make_scheduler(loaded: LoadedModel, limits: ServerLimits, max_batch_size: int = 8,
                   kv_cache_bytes: int | None = None, decode: str = "dynamic", collective: bool = False) -> Scheduler:
    """The scheduler a server runs on; under tensor parallel (`collective`) every rank makes one."""
    from meshtron.infer.loading import pad_token_id

    return Scheduler(loaded.model, loaded.tokenizer, pad_token_id(loaded.tokenizer), max_batch_size,
                     max_len=limits.max_model_len, kv_cache_bytes=kv_cache_bytes, decode=decode, collective=collective)


def _error(status: int, message: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code or status}})


def _check_request(body: _Sampling, served: str) -> None:
    """Refuse a model this server does not serve, and any field it would otherwise ignore."""
    if body.model is not None and body.model != served:
        raise ClientError(404, f"model {body.model!r} is not served here; this server serves {served!r}", "model")
    extras = dict(body.model_extra or {})
    for i, message in enumerate(getattr(body, "messages", [])):
        extras.update({f"messages[{i}].{k}": v for k, v in (message.model_extra or {}).items()})
    extras.update({f"stream_options.{k}": v for k, v in (body.stream_options or {}).items() if k != "include_usage"})
    for name, value in extras.items():
        if value is not None and (name not in _NO_OP_FIELDS or value != _NO_OP_FIELDS[name]):
            raise ClientError(400, f"'{name}' is not supported by this server; remove it from the request", name)


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
            stop_strings=tuple(stop), seed=body.seed, logprobs=body.num_logprobs(),
        )
    except ValueError as e:
        raise ClientError(400, str(e)) from None


class _LogprobFormat:
    """Token log-probabilities in OpenAI's two shapes: chat's `content` list of {token, logprob,
    bytes, top_logprobs}, and completions' parallel lists (tokens, token_logprobs, top_logprobs as
    {token: logprob} with the chosen token always present, text_offset)."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # completions: characters of the tokens formatted so far (text_offset)

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_item(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def __call__(self, entries: list[TokenLogprob]) -> dict:
        if self.chat:
            return {"content": [{**self._chat_item(e.token_id, e.logprob),
                                 "top_logprobs": [self._chat_item(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        tokens = [self.token(e.token_id) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        top = [{**{self.token(t): lp for t, lp in e.top}, **{tok: e.logprob}} for e, tok in zip(entries, tokens)]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}


@dataclass
class _Meta:
    id: str
    object: str
    model: str
    prompt_tokens: int
    format_logprobs: _LogprobFormat | None = None  # None: the request asked for none

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        return self.format_logprobs(entries or []) if self.format_logprobs is not None else None

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


async def _chunks(scheduler: Scheduler, request: Request) -> AsyncIterator[tuple[str | Completion, list]]:
    """(text chunk, the log-probabilities of the tokens since the last chunk) as the worker produces
    them, then (the finished Completion, those of any tokens left)."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()
    pending: list[TokenLogprob] = []
    request.on_text = lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, chunk)
    request.on_logprob = lambda entry: loop.call_soon_threadsafe(chunks.put_nowait, entry)
    future = scheduler.submit(request)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(chunks.put_nowait, None))
    try:
        while (chunk := await chunks.get()) is not None:
            if isinstance(chunk, TokenLogprob):
                pending.append(chunk)
            else:
                yield chunk, pending
                pending = []
        yield future.result(), pending
    finally:
        # Reached early when the client disconnects and the response stops reading this stream.
        if not future.done():
            request.cancelled.set()


async def _stream_chat(scheduler, request, meta: _Meta, include_usage: bool) -> AsyncIterator[dict]:
    head = {**meta.head(), "object": "chat.completion.chunk"}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for item, entries in _chunks(scheduler, request):
        if isinstance(item, str):
            yield {**head, "choices": [{"index": 0, "delta": {"content": item}, "finish_reason": None,
                                        "logprobs": meta.logprobs(entries)}]}
        else:
            yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason,
                                        "logprobs": meta.logprobs(entries) if entries else None}]}
            if include_usage:
                yield {**head, "choices": [], "usage": meta.usage(item)}


async def _stream_completion(scheduler, request, meta: _Meta, include_usage: bool) -> AsyncIterator[dict]:
    head = meta.head()
    async for item, entries in _chunks(scheduler, request):
        if isinstance(item, str):
            yield {**head, "choices": [{"index": 0, "text": item, "finish_reason": None,
                                        "logprobs": meta.logprobs(entries)}]}
        else:
            yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": item.finish_reason,
                                        "logprobs": meta.logprobs(entries) if entries else None}]}
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

"""The OpenAI-compatible HTTP server (FastAPI): completions, chat completions, embeddings, models,
health, Prometheus metrics and the chat page.

Every request body is read here (size-capped), decoded as strict UTF-8, parsed as JSON and
validated by the pydantic models in `protocol`, so every malformed request gets an OpenAI-style
4xx and never reaches a model. Answers carry the name of the model that produced them in the
`model` field and in the `x-slmkit-model` header.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from contextlib import aclosing
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from slmkit.serve.backend import Prompt, Settings
from slmkit.serve.metrics import Metrics
from slmkit.serve.ollama_api import add_ollama_routes
from slmkit.serve.protocol import MAX_N, ApiError, ChatRequest, CompletionRequest, EmbeddingRequest, error_response
from slmkit.serve.scheduler import Event
from slmkit.toolcalls import CallStream, parse_calls

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a small model's context


class AuthAndCount:
    """The API key check and the request counters, as plain ASGI middleware: Starlette's
    `@app.middleware("http")` passes every streamed chunk through an extra task and memory stream,
    which costs the event loop (and, on 2 cores, the model) time at every token of every stream."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path = time.perf_counter(), scope["path"]
        if self.api_key and path.startswith(("/v1/", "/api/")):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}"):
                response = error_response(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                          type="invalid_request_error", code="invalid_api_key")
                self.metrics.request(path, 401, time.perf_counter() - started)
                return await response(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":  # the latency counted: until the answer starts
                self.metrics.request(path, message["status"], time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, counted)


def create_app(backends: dict, api_key: str | None = None, timeout: float = 600.0,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """backends: model name -> a backend (`LocalBackend`, or the router under the name "auto")."""
    app = FastAPI(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(backends)
    app.state.metrics, app.state.backends = metrics, backends
    for backend in backends.values():
        if hasattr(backend, "metrics"):  # the router counts its decisions
            backend.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        if request.url.path.startswith("/api/"):  # the Ollama API answers {"error": "..."}
            return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)
        return error.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _error):
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _bad_method(request: Request, _error):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    @app.exception_handler(Exception)
    async def _unexpected(_request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}: {error}", type="server_error")

    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(backends)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("slmkit.serve") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "slmkit"}
                                           for name in backends]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read(request, CompletionRequest, max_body)
        backend = _backend(backends, body.model)
        if body.best_of not in (None, 1) or body.suffix:
            raise ApiError(400, "best_of and suffix are not supported", param="best_of" if body.best_of else "suffix")
        prompts = _prompts(body.prompt)
        if len(prompts) * body.n > MAX_N:
            raise ApiError(400, f"at most {MAX_N} choices per request (prompts x n)", param="n")
        settings = Settings(body.max_tokens, body.sampling, body.n, body.logprobs, body.echo, timeout,
                            body.output_format)
        return await _answer(backend, body, prompts, settings, chat=False, metrics=metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read(request, ChatRequest, max_body)
        backend = _backend(backends, body.model)
        tools = body.tool_use()
        top = (body.top_logprobs or 0) if body.logprobs else None
        settings = Settings(body.token_limit, body.sampling, body.n, top, False, timeout, body.output_format)
        prompt = Prompt(messages=[m.template_dict() for m in body.messages], tools=tools)
        return await _answer(backend, body, [prompt], settings, chat=True, metrics=metrics)

    add_ollama_routes(app, backends, timeout)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _read(request, EmbeddingRequest, max_body)
        backend = _backend(backends, body.model)
        if not hasattr(backend, "embed"):
            raise ApiError(400, f"model '{body.model}' does not serve embeddings (the router and remote models do "
                           "not)", param="model")
        texts, ids = body.texts_or_ids()
        result = await asyncio.to_thread(backend.embed, texts, ids, body.dimensions)
        return {"object": "list", "model": body.model, "data": [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)],
            "usage": {"prompt_tokens": sum(result.tokens), "total_tokens": sum(result.tokens)}}

    return app


def _encode_vector(vector, encoding: str):
    """A vector as JSON floats, or as base64 of its little-endian float32 bytes (the openai client's default)."""
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


# -- reading requests -----------------------------------------------------------------------------


async def _read(request: Request, model_cls, max_body: int):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"the request body is {int(declared):,} bytes; the limit is {max_body:,}",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_body:
            raise ApiError(413, f"the request body exceeds the limit of {max_body:,} bytes", code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # also numbers too long to parse and absurd nesting
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = model_cls.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None
    if unknown := body.unsupported_fields:
        raise ApiError(400, f"unrecognized request argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                       "this server does not implement it; leave it out", param=unknown[0], code="unsupported_parameter")
    body.output_format  # a bad response_format / guided_choice is refused here, before any work
    return body


def _backend(backends: dict, name: str):
    if name not in backends:
        raise ApiError(400, f"the model '{name}' is not served here; choose one of: {', '.join(backends)}",
                       param="model", code="model_not_found")
    return backends[name]


def _prompts(prompt) -> list[Prompt]:
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [Prompt(token_ids=list(prompt))]
    return [Prompt(text=p) for p in prompt]


# -- answering --------------------------------------------------------------------------------------


class _Choice:
    """What one choice has produced so far."""

    def __init__(self):
        self.text, self.tokens, self.finish_reason = "", [], None
        self.prompt_tokens, self.completion_tokens = [], 0


async def _answer(backend, body, prompts: list[Prompt], settings: Settings, chat: bool, metrics):
    """Run every prompt's choices; one JSON answer, or a server-sent event stream."""
    runs = [backend.start(p, settings) for p in prompts]  # validates every prompt before any work
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = chat and bool((getattr(body, "stream_options", None) or {}).get("include_usage"))
        stream = _stream(runs, settings, rid, created, body.model, chat, include_usage, metrics)
        # Wait for the first chunk before answering: a full queue (429) or a failure gets a proper status,
        # and the headers can say which model answered.
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = ""
        except BaseException:
            await stream.aclose()
            raise
        return StreamingResponse(_prepend(first, stream), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **_headers(runs, body.model)})
    started = time.perf_counter()
    choices: dict[int, _Choice] = {}
    async with aclosing(_events(runs, settings.n)) as events:  # closed at once if a choice fails
        async for index, event in events:
            _apply(choices.setdefault(index, _Choice()), event)
    usage = _usage(runs, sum(c.completion_tokens for c in choices.values()))
    metrics.tokens(body.model, usage["prompt_tokens"], usage["completion_tokens"])
    metrics.latency(body.model, time.perf_counter() - started)
    payload = _full_answer(rid, created, _answered_by(runs, body.model), choices, runs, settings, chat, usage)
    if runs[0].route:
        payload["slmkit_route"] = runs[0].route
    return JSONResponse(payload, headers=_headers(runs, body.model))


async def _events(runs, n: int):
    """(choice index over all prompts, event) from every run in turn; the runs' unfinished jobs are
    cancelled however this ends (a failed choice, or a client that went away, frees their slots)."""
    try:
        for number, run in enumerate(runs):
            async for index, event in run.events():
                yield number * n + index, event
    finally:
        for run in runs:
            await run.aclose()


def _usage(runs, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(r.ids) for r in runs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _headers(runs, requested: str) -> dict:
    """Which model answered, and the router's decision when it made one."""
    headers = {"x-slmkit-model": _answered_by(runs, requested)}
    if runs[0].route:
        headers["x-slmkit-route"] = runs[0].route["decision"]
    return headers


def _apply(choice: _Choice, event: Event) -> None:
    if event.kind == "error":
        raise ApiError(500, event.message, type="server_error")
    if event.kind == "prompt":
        choice.prompt_tokens = event.tokens
    elif event.kind == "text":
        choice.text += event.text
        choice.tokens += event.tokens
    elif event.kind == "done":
        if event.finish_reason == "timeout":
            raise ApiError(504, "the request timed out before the answer was complete", type="timeout",
                           code="timeout")
        choice.finish_reason = event.finish_reason
        choice.completion_tokens = event.completion_tokens


def _answered_by(runs, requested: str) -> str:
    names = {r.answered_by for r in runs if r.answered_by}
    return names.pop() if len(names) == 1 else requested


def _full_answer(rid, created, model, choices: dict[int, _Choice], runs, settings: Settings, chat: bool,
                 usage: dict) -> dict:
    out = []
    for index in sorted(choices):
        c = choices[index]
        if chat:
            message, reason = _chat_message(c.text, c.finish_reason, _tool_format(runs, index, settings))
            item = {"index": index, "message": message,
                    "logprobs": _chat_logprobs(c.tokens) if settings.top_logprobs is not None else None,
                    "finish_reason": reason}
        else:
            run = runs[index // settings.n]
            text = run.prompt_text + c.text if settings.echo else c.text
            item = {"index": index, "text": text, "finish_reason": c.finish_reason,
                    "logprobs": _completion_logprobs(c.prompt_tokens + c.tokens) if settings.top_logprobs is not None
                    else None}
        out.append(item)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": out, "usage": usage}


def _tool_format(runs, index: int, settings: Settings) -> str | None:
    """The call format to read choice `index` with (None: the chat has no tools)."""
    return getattr(runs[index // settings.n], "tool_format", None)


def _chat_message(text: str, finish_reason: str | None, tool_format: str | None) -> tuple[dict, str | None]:
    """The assistant message (with `tool_calls` when the answer made calls) and its finish reason."""
    if tool_format is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse_calls(text, tool_format)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def _completion_logprobs(tokens) -> dict:
    """The legacy completions shape: parallel lists of tokens, log-probs, top alternatives, offsets."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens],
            "token_logprobs": [None if t.logprob != t.logprob else t.logprob for t in tokens],  # NaN: first token
            "top_logprobs": [t.top for t in tokens], "text_offset": offsets}


def _chat_logprobs(tokens) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob),
                         "top_logprobs": [entry(k, v) for k, v in (t.top or {}).items()]} for t in tokens]}


async def _stream(runs, settings: Settings, rid, created, model, chat, include_usage, metrics):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    started, first_token, completion_tokens = time.perf_counter(), None, 0
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        answered = _answered_by(runs, model)
        body = {"id": rid, "object": obj, "created": created, "model": answered, "choices": choices, **extra}
        if runs[0].route:
            body["slmkit_route"] = runs[0].route
        return f"data: {json.dumps(body)}\n\n"

    greeted: set[int] = set()
    calls: dict[int, _CallDeltas] = {}  # choice index -> its tool-call splitter (chats with tools)
    async with aclosing(_events(runs, settings.n)) as events:  # an early return frees the slots too
        async for index, event in events:
            if event.kind == "error":
                yield f"data: {json.dumps({'error': {'message': event.message, 'type': 'server_error'}})}\n\n"
                return
            if chat and index not in greeted:
                greeted.add(index)
                if tool_format := _tool_format(runs, index, settings):
                    calls[index] = _CallDeltas(tool_format)
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            if event.kind == "text" and (event.text or event.tokens):
                if first_token is None:
                    first_token = time.perf_counter() - started
                    metrics.first_token(model, first_token)
                if index in calls:
                    for delta in calls[index].feed(index, event.text):
                        yield chunk([delta])
                else:
                    yield chunk([_delta(index, event, settings, chat)])
            elif event.kind == "done":
                completion_tokens += event.completion_tokens
                reason = "length" if event.finish_reason == "timeout" else event.finish_reason
                if reason == "cancelled":
                    return
                if index in calls:
                    for delta in calls[index].feed(index, "", final=True):
                        yield chunk([delta])
                    reason = "tool_calls" if calls[index].count and reason == "stop" else reason
                end = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": index, **end, "logprobs": None, "finish_reason": reason}])
    usage = _usage(runs, completion_tokens)
    if include_usage:
        yield chunk([], usage=usage)
    yield "data: [DONE]\n\n"
    metrics.tokens(model, usage["prompt_tokens"], completion_tokens)
    metrics.latency(model, time.perf_counter() - started)


class _CallDeltas:
    """One choice's streamed answer as OpenAI's deltas: content, or `tool_calls` entries, each call
    sent whole (id, name and arguments) as soon as it is complete."""

    def __init__(self, tool_format: str):
        self.splitter, self.count = CallStream(tool_format), 0

    def feed(self, index: int, text: str, final: bool = False) -> list[dict]:
        content, calls = self.splitter.feed(text, final)
        out = [{"index": index, "delta": {"content": content}, "logprobs": None, "finish_reason": None}] if content else []
        for call in calls:
            out.append({"index": index, "delta": {"tool_calls": [call.openai(self.count)]}, "logprobs": None,
                        "finish_reason": None})
            self.count += 1
        return out


async def _prepend(first: str, rest):
    if first:
        yield first
    async for item in rest:
        yield item


def _delta(index: int, event: Event, settings: Settings, chat: bool) -> dict:
    wants = settings.top_logprobs is not None
    if chat:
        return {"index": index, "delta": {"content": event.text},
                "logprobs": _chat_logprobs(event.tokens) if wants else None, "finish_reason": None}
    return {"index": index, "text": event.text, "logprobs": _completion_logprobs(event.tokens) if wants else None,
            "finish_reason": None}

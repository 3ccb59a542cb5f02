"""The Ollama API beside the OpenAI one, so tools written against Ollama run unchanged:
/api/chat, /api/generate (NDJSON streaming, Ollama's default), /api/embed, /api/tags, /api/show,
/api/version.

Requests go through the same backends, scheduler and checks as /v1. Ollama's option names map to
the sampler's: num_predict (-1: until the context is full), temperature (Ollama's default 0.8),
top_k, top_p, seed, stop, repeat_penalty, frequency_penalty, presence_penalty; num_ctx is accepted
when it fits the served context. `format` is "json" or a JSON Schema. /api/chat takes `tools` (as
Ollama: the model may answer or call, under the same grammar as the OpenAI route's `auto`), assistant
`tool_calls` and `tool` messages in the history, and answers calls as Ollama does (arguments as an
object; streamed whole as each call completes). An option or field this server does not implement
is refused with a 400 naming it, never ignored. Errors are Ollama's `{"error": "..."}` with the HTTP
status.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from slmkit import __version__
from slmkit.errors import SlmError
from slmkit.infer.constrain import OutputFormat
from slmkit.infer.sampling import SamplingParams
from slmkit.serve.backend import Prompt, Settings
from slmkit.serve.protocol import ApiError
from slmkit.toolcalls import CallStream, ToolCall, ToolError, ToolUse, call_from_message, check_tool_history, read_tools

DETAILS = {"format": "slmkit", "family": "", "parameter_size": "", "quantization_level": ""}
OLLAMA_TEMPERATURE = 0.8  # Ollama's default when the request names none
OPTIONS = {"num_predict", "temperature", "top_k", "top_p", "seed", "stop", "repeat_penalty", "frequency_penalty",
           "presence_penalty", "num_ctx"}
HARMLESS = {"keep_alive", "think", "stream", "options", "format", "model"}  # `think`: no reasoning models here
MESSAGE_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
                  "assistant": {"role", "content", "tool_calls"}, "tool": {"role", "content", "tool_name"}}
FIELDS = {"chat": HARMLESS | {"messages", "tools"}, "generate": HARMLESS | {"prompt", "system", "raw"},
          "embed": {"model", "input", "keep_alive", "truncate", "options", "dimensions"}, "show": {"model", "name", "verbose"}}


def add_ollama_routes(app: FastAPI, backends: dict, timeout: float) -> None:
    @app.get("/api/version")
    async def version():
        return {"version": __version__}

    @app.get("/api/tags")
    async def tags():
        now = datetime.now(timezone.utc).isoformat()
        return {"models": [{"name": name, "model": name, "modified_at": now, "size": 0, "digest": "",
                            "details": DETAILS} for name in backends]}

    @app.post("/api/show")
    async def show(request: Request):
        body = await _body(request, "show")
        backend = _backend(backends, body.get("model") or body.get("name"))
        template = getattr(getattr(backend, "tokenizer", None), "chat_template", None) or ""
        return {"modelfile": "", "parameters": "", "template": template, "details": DETAILS,
                "model_info": {"general.context_length": getattr(backend, "context", None)},
                "capabilities": ["completion", "tools", "embedding"] if hasattr(backend, "embed") else ["completion"]}

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await _body(request, "chat")
        backend = _backend(backends, body.get("model"))
        prompt = Prompt(messages=_chat_messages(body.get("messages")), tools=_tools(body.get("tools")))
        if prompt.tools:
            try:
                check_tool_history(prompt.messages)
            except ToolError as error:
                raise ApiError(400, str(error), param=error.path) from None
        return await _answer(backend, body, prompt, timeout, chat=True)

    @app.post("/api/generate")
    async def generate(request: Request):
        body = await _body(request, "generate")
        backend = _backend(backends, body.get("model"))
        text = body.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be text", param="prompt")
        if body.get("raw") or not getattr(getattr(backend, "tokenizer", None), "chat_template", None):
            prompt = Prompt(text=text)
        else:  # as Ollama does: the prompt (and system) through the model's template
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            prompt = Prompt(messages=system + [{"role": "user", "content": text}])
        return await _answer(backend, body, prompt, timeout, chat=False)

    @app.post("/api/embed")
    async def embed(request: Request):
        body = await _body(request, "embed")
        backend = _backend(backends, body.get("model"))
        if not hasattr(backend, "embed"):
            raise ApiError(400, f"model '{body.get('model')}' does not serve embeddings", param="model")
        _options(body.get("options"))  # none changes an embedding: any named is refused
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a text or a list of texts", param="input")
        started = time.perf_counter_ns()
        result = await asyncio.to_thread(backend.embed, texts, [], body.get("dimensions"))
        return {"model": body["model"], "embeddings": result.vectors.tolist(),
                "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                "prompt_eval_count": sum(result.tokens)}


async def _body(request: Request, kind: str) -> dict:
    try:
        data = json.loads((await request.body()).decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # the official client sends every field it knows, unset ones as null / "" / []: those ask for nothing
    data = {k: v for k, v in data.items() if k in ("prompt", "messages", "input") or v not in (None, "", [], {})}
    unknown = sorted(set(data) - FIELDS[kind])
    if unknown:
        raise ApiError(400, f"field {', '.join(unknown)} is not supported by this server; leave it out", param=unknown[0])
    return data


def _chat_messages(messages) -> list[dict]:
    """Ollama's chat history as OpenAI's messages: its calls have no ids, so each gets one, and each
    tool result answers the earliest call still open (of its `tool_name`, when it names one)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in MESSAGE_FIELDS and isinstance(m.get("content", ""), str)
            for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role: system|user|assistant|tool, content: text}",
                       param="messages")
    out, open_calls = [], []  # open_calls: (id, tool name) of calls no result has answered yet
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v not in (None, "", [])} | {"content": m.get("content") or ""}
        extra = sorted(set(m) - MESSAGE_FIELDS[m["role"]])
        if extra:
            raise ApiError(400, f"message field {extra[0]} is not supported by this server", param=extra[0])
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            message["tool_calls"] = [_openai_call(call, f"call_{i}_{j}", f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(m["tool_calls"])]
            open_calls += [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
        if m["role"] == "tool":
            match = [c for c in open_calls if m.get("tool_name") in (None, c[1])]
            if not match:
                raise ApiError(400, f"messages[{i}] is a tool result, but no earlier assistant call is waiting for "
                               f"one{' from ' + m['tool_name'] if m.get('tool_name') else ''}", param=f"messages[{i}]")
            open_calls.remove(match[0])
            message["tool_call_id"] = match[0][0]
        out.append(message)
    return out


def _openai_call(call, call_id: str, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, 'each tool call is {"function": {"name": ..., "arguments": {...}}}', param=where)
    return replace(call_from_message(call), id=call_id).openai()


def _tools(tools) -> ToolUse | None:
    """Ollama's `tools` (OpenAI's function format); the model chooses between text and a call."""
    if not tools:
        return None
    try:
        return ToolUse(read_tools(tools))
    except ToolError as error:
        raise ApiError(400, str(error), param=error.path) from None


def _backend(backends: dict, name):
    if name not in backends:
        raise ApiError(404, f"model '{name}' not found; served here: {', '.join(backends)}", param="model")
    return backends[name]


def _options(options) -> dict:
    options = options or {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object", param="options")
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ApiError(400, f"option {', '.join(unknown)} is not implemented by this server; leave it out",
                       param=unknown[0])
    return options


def _settings(body: dict, backend, timeout: float) -> Settings:
    o = _options(body.get("options"))
    context = getattr(backend, "context", None)
    if "num_ctx" in o and context is not None and o["num_ctx"] > context:
        raise ApiError(400, f"num_ctx {o['num_ctx']} is more than this model's served context ({context})",
                       param="num_ctx")
    predict = o.get("num_predict")
    stop = o.get("stop") or []
    try:
        sampling = SamplingParams(temperature=float(o.get("temperature", OLLAMA_TEMPERATURE)), top_k=int(o.get("top_k", 0)),
                                  top_p=float(o.get("top_p", 1.0)), seed=o.get("seed"),
                                  stop=[stop] if isinstance(stop, str) else list(stop),
                                  repetition_penalty=float(o.get("repeat_penalty", 1.0)),
                                  frequency_penalty=float(o.get("frequency_penalty", 0.0)),
                                  presence_penalty=float(o.get("presence_penalty", 0.0)))
    except (TypeError, ValueError, SlmError) as error:
        raise ApiError(400, f"options: {error}", param="options") from None
    max_tokens = None if predict is None or predict < 0 else int(predict)
    return Settings(max_tokens, sampling, 1, None, False, timeout, _format(body.get("format")))


def _format(fmt) -> OutputFormat | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return OutputFormat("json_object")
    if isinstance(fmt, dict):
        return OutputFormat("json_schema", schema=fmt)
    raise ApiError(400, f"format must be \"json\" or a JSON Schema object, not {fmt!r:.40}", param="format")


async def _answer(backend, body: dict, prompt: Prompt, timeout: float, chat: bool):
    settings = _settings(body, backend, timeout)
    run = backend.start(prompt, settings)  # validates before any work
    name, started = body["model"], time.perf_counter_ns()
    pieces = _split(_pieces(run), getattr(run, "tool_format", None))
    if body.get("stream", True):  # Ollama streams unless told not to
        async def ndjson():
            async for text, calls, final in pieces:
                yield json.dumps(_message(name, text, chat, calls) if final is None else
                                 _final(name, chat, final, run, started)) + "\n"
        lines = ndjson()
        first = await anext(lines)  # a full queue or a failure before the first piece gets its own status

        async def stream():
            yield first
            async for line in lines:
                yield line
        return StreamingResponse(stream(), media_type="application/x-ndjson")
    text, all_calls, final = "", [], None
    async for piece, calls, done in pieces:
        text, all_calls, final = text + piece, all_calls + calls, done or final
    return JSONResponse({**_final(name, chat, final, run, started), **_message(name, text, chat, all_calls)} |
                        {"done": True})


async def _pieces(run):
    """(text, None) for each piece of the answer, then ("", the done event)."""
    try:
        async for _index, event in run.events():
            if event.kind == "error":
                raise ApiError(500, event.message, type="server_error")
            if event.kind == "text" and event.text:
                yield event.text, None
            elif event.kind == "done":
                if event.finish_reason == "timeout":
                    raise ApiError(504, "the request timed out before the answer was complete", type="timeout")
                yield "", event
    finally:
        await run.aclose()


async def _split(pieces, tool_format: str | None):
    """(content, calls, None) for each piece of the answer, then ("", [], the done event); in a chat
    with tools, text that may begin a call is held back and each call comes whole when it closes."""
    splitter = CallStream(tool_format) if tool_format else None
    async for text, final in pieces:
        if splitter is None:
            yield text, [], final
            continue
        content, calls = splitter.feed(text, final is not None)
        if content or calls:
            yield content, calls, None
        if final is not None:
            yield "", [], final


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _message(name: str, text: str, chat: bool, calls: list[ToolCall] = ()) -> dict:
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.argument_values()}} for c in calls]
    body = {"message": message} if chat else {"response": text}
    return {"model": name, "created_at": _now(), **body, "done": False}


def _final(name: str, chat: bool, event, run, started: int) -> dict:
    elapsed = time.perf_counter_ns() - started
    reason = "length" if getattr(event, "finish_reason", None) == "length" else "stop"
    return {**_message(name, "", chat), "done": True, "done_reason": reason, "total_duration": elapsed,
            "load_duration": 0, "prompt_eval_count": len(run.ids), "prompt_eval_duration": 0,
            "eval_count": getattr(event, "completion_tokens", 0), "eval_duration": elapsed}

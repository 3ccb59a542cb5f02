"""The OpenAI request bodies we accept (pydantic models, so wrong types are caught before any work)
and the OpenAI error shape we answer with.

A field we do not implement is refused with a 400 that names it, never silently ignored (OpenAI's
own API answers "Unrecognized request argument supplied" the same way): undeclared fields are
collected by pydantic (`extra="allow"`) and `unsupported_fields` names them; only fields that
change nothing about the answer (`metadata`, `store`, `service_tier`, `parallel_tool_calls` without
tools) pass. Declared fields we cannot honour (`best_of`, `suffix`) are refused where the request is answered.

Tools: `tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool` messages as
in OpenAI's API (`slmkit.toolcalls` writes the prompt, the grammar and reads the calls).

Structured output: `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} as in OpenAI's API, and `guided_choice` (a list of
labels, vLLM's name for it; send it with the openai client's `extra_body`).
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmkit.errors import SlmError
from slmkit.infer.constrain import OutputFormat
from slmkit.infer.sampling import SamplingParams
from slmkit.toolcalls import ToolError, ToolUse, check_tool_history, read_tool_choice, read_tools

MAX_N = 8
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error the client caused (or must wait out), answered as OpenAI error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# OpenAI fields that do not change the answer: accepted and not acted on
HARMLESS_FIELDS = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                             "safety_identifier"})


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # token id (a JSON string key) -> bias in [-100, 100]
    response_format: dict | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias):
        for token, value in (bias or {}).items():
            if token < 0 or not -100 <= value <= 100:
                raise ValueError(f"token {token}: ids are >= 0 and biases in [-100, 100]")
        return bias

    @property
    def unsupported_fields(self) -> list[str]:
        """Fields the request sent that this server does not know (each would otherwise be ignored)."""
        return sorted(set(self.model_extra or {}) - HARMLESS_FIELDS)

    @property
    def output_format(self) -> OutputFormat | None:
        """What `response_format` / `guided_choice` ask for (None: free text); a 400 naming the problem."""
        fmt = dict(self.response_format or {"type": "text"})
        kind = fmt.get("type")
        if self.guided_choice is not None:
            if kind != "text":
                raise ApiError(400, "give either guided_choice or a response_format, not both", param="guided_choice")
            return _format("choices", choices=tuple(self.guided_choice), param="guided_choice")
        if kind == "text":
            return None
        if kind == "json_object":
            return OutputFormat("json_object")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            return _format("json_schema", schema=schema, param="response_format")
        raise ApiError(400, f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                       param="response_format", code="unsupported_parameter")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def sampling(self) -> SamplingParams:
        """The request's sampling settings (the fields are checked above; max_new_tokens is the
        backend's to set: it depends on the prompt's length when max_tokens is left out)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stops,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logit_bias=dict(self.logit_bias or {}))


def _format(kind: str, param: str, **fields) -> OutputFormat:
    """OutputFormat(kind, **fields), its refusal answered as a 400 on `param`."""
    try:
        return OutputFormat(kind, **fields)
    except SlmError as error:
        raise ApiError(400, str(error), param=param) from None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls: [{"id", "type": "function", "function": {...}}]
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def template_dict(self) -> dict:
        """The message as chat templates read it (developer is the system role of older models)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out

    def text(self) -> str:
        """The message text (content parts of type "text" are joined, as for a text-only model)."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, "only text content parts are supported by a text model",
                                   param="messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    stream_options: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    # One call per answer unless asked (llama.cpp's default too): a small model that may add calls
    # tends to repeat the first one until the budget ends it.
    parallel_tool_calls: bool = False

    def tool_use(self) -> ToolUse | None:
        """The request's tools and tool_choice, checked (a 400 naming the JSON path of a problem)."""
        try:
            check_tool_history([m.template_dict() for m in self.messages])
            if not self.tools:
                if self.tool_choice not in (None, "none", "auto"):
                    raise ToolError("asks for a tool call, but the request gives no tools", "tool_choice")
                return None
            tools = read_tools(self.tools)
            return ToolUse(tools, read_tool_choice(self.tool_choice, tools), self.parallel_tool_calls)
        except ToolError as error:
            raise ApiError(400, str(error), param=error.path, code="invalid_value") from None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings body: text, texts, token ids or lists of token ids."""

    model_config = ConfigDict(extra="allow", strict=False)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    unsupported_fields = _Common.unsupported_fields

    @property
    def output_format(self) -> None:
        """Nothing to constrain (`_read` asks every request)."""
        return None

    def texts_or_ids(self) -> tuple[list[str], list[list[int]]]:
        """(texts, token id lists): one of the two is empty."""
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if items and all(isinstance(i, int) for i in items):
            return [], [list(items)]
        if items and all(isinstance(i, list) for i in items):
            return [], [list(i) for i in items]
        return [i for i in items if isinstance(i, str)], []

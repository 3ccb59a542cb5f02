"""Tool calls in chats: OpenAI `tools` in, each model family's own call format out, and the calls parsed back.

A family's format is read from its chat template, because that is what the model was trained on:

- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen2.5,
  Qwen3, SmolLM3, Hermes). The template lists the tools itself (it is rendered with `tools=`).
- "llama3": one bare JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3; the template
  lists the tools and renders results under the `ipython` role).
- "smollm2": `<tool_call>[\n{"name": ..., "arguments": {...}}\n]</tool_call>`, a JSON list of calls, after
  the system prompt SmolLM2-Instruct was tuned on for function calling (its chat template is plain
  ChatML, recognized by its default system message; Ollama's smollm2 template writes the same).
- "generic": templates that know nothing of tools (Gemma, plain ChatML). The tools and the hermes
  call form are described in the system message.

For "smollm2" and "generic", calls in the history are written back in the call form and tool
results become user turns wrapped in `<tool_response>`.

A call is generated under a grammar (llguidance's lark, with each tool's parameters embedded as
JSON Schema), so every emitted call parses and its arguments validate. With `auto` the grammar lets
the model write either text or calls: text may not begin the way a call begins, so a call can never
come out half-formed as text. `none` allows only that text; `required` and a named tool allow only
calls. transformers' `get_json_schema`-style tools are taken as OpenAI sends them.

Pure Python at the foundation (no torch): fine-tuning data, the server and `slm chat` all use it;
the grammar is a lark string that `slmkit.infer.constrain` compiles for the model's tokens.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import jsonschema

from slmkit.errors import SlmError

TOOL_FORMATS = ("hermes", "llama3", "smollm2", "generic")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
GENERIC_PROMPT = (
    "You can call functions. Their signatures are given as JSON Schema within <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with only a JSON object with its name and arguments within "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "Otherwise answer in plain text. A function's result comes back within <tool_response></tool_response>.")
SMOLLM2_PROMPT = (  # SmolLM2-Instruct's function-calling system prompt, as its model card and Ollama give it
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n"
    '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "(more tool calls as required)\n]</tool_call>")


class ToolError(SlmError):
    """A tool definition or a tool message that cannot be used; `path` names the JSON path of the problem."""

    def __init__(self, message: str, path: str):
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object

    def openai(self) -> dict:
        """The tool as OpenAI and transformers' chat templates expect it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolUse:
    """A chat's tools, OpenAI's tool_choice read as "auto" | "none" | "required" | a tool's name,
    and whether several calls may come in one answer."""

    tools: list[Tool]
    choice: str = "auto"
    parallel: bool = False


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}

    def argument_values(self):
        """The arguments as an object (as family templates and Ollama write them); text that is not
        JSON stays text."""
        try:
            return json.loads(self.arguments or "{}")
        except ValueError:
            return self.arguments


def read_tools(tools: list, param: str = "tools") -> list[Tool]:
    """OpenAI's `tools` list -> Tools; a ToolError naming the JSON path of the first problem."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("give a non-empty list of tools", param)
    out: list[Tool] = []
    for i, item in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise ToolError("each tool must be {\"type\": \"function\", \"function\": {...}}", f"{where}.type")
        function = item.get("function")
        if not isinstance(function, dict):
            raise ToolError("missing the function object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError("a function name is 1-64 letters, digits, _ . or -", f"{where}.function.name")
        if any(t.name == name for t in out):
            raise ToolError(f"two tools are named '{name}'", f"{where}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _check_schema(parameters, f"{where}.function.parameters")
        out.append(Tool(name, str(function.get("description") or ""), parameters))
    return out


def _check_schema(schema, where: str) -> None:
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ToolError("the parameters must be a JSON Schema of type object", where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ToolError(error.message, where + error.json_path.removeprefix("$")) from None


def read_tool_choice(choice, tools: list[Tool]) -> str:
    """OpenAI's `tool_choice` ("auto", "none", "required" or {"type": "function", "function": {"name"}})
    -> "auto" | "none" | "required" | a tool's name."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolError(f"'{choice}' is not a tool_choice; use auto, none, required or "
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        return choice
    name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ToolError('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
    if not any(t.name == name for t in tools):
        raise ToolError(f"names '{name}', which is not among the tools ({', '.join(t.name for t in tools)})",
                        "tool_choice")
    return name


def check_tool_history(messages: list[dict]) -> None:
    """Every `tool` message answers a call id an earlier assistant message made (OpenAI's rule)."""
    open_ids: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            if message["role"] != "assistant":
                raise ToolError("only assistant messages make tool calls", f"messages[{i}].tool_calls")
            if not isinstance(call, dict) or not isinstance((call.get("function") or {}).get("name"), str):
                raise ToolError('each call is {"id", "type": "function", "function": {"name", "arguments"}}',
                                f"messages[{i}].tool_calls")
            open_ids.add(str(call.get("id", "")))
        if message["role"] == "tool" and message.get("tool_call_id") not in open_ids:
            raise ToolError(f"tool_call_id {message.get('tool_call_id')!r} answers no earlier assistant tool call",
                            f"messages[{i}].tool_call_id")


def tool_format(chat_template: str | None) -> str:
    """The family's call format, recognized by what its chat template writes."""
    template = chat_template or ""
    if _HERMES_OPEN in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    if "named SmolLM" in template:  # SmolLM2-Instruct's ChatML template and its default system message
        return "smollm2"
    return "generic"


# -- the prompt -------------------------------------------------------------------------------------


def template_messages(messages: list[dict], tools: list[Tool] | None, kind: str,
                      writes_calls: bool = True) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for rendering a chat that has tools or tool turns.

    Family templates get the OpenAI messages with each call's arguments as an object (Qwen's and
    Llama's templates write them with `tojson`) and `tools=`; where such a template does not write
    an assistant's `tool_calls` itself (`writes_calls` False: SmolLM3's), the calls are written into
    the content in the family's format. A generic template gets plain turns."""
    if kind not in ("generic", "smollm2"):  # families whose templates know tools
        out = [_with_argument_objects(m) if writes_calls else _calls_as_text(m, kind) for m in messages]
        return out, ({"tools": [t.openai() for t in tools]} if tools else {})
    return _tool_prompt(_plain_turns(messages, kind), tools, kind), {}


def _plain_turns(messages: list[dict], kind: str) -> list[dict]:
    """Calls written into the assistant's text; tool results as user turns (several in a row: one turn)."""
    out: list[dict] = []
    for message in messages:
        if message["role"] != "tool":
            out.append({"role": message["role"], "content": _calls_as_text(message, kind)["content"]})
            continue
        block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
        if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
        else:
            out.append({"role": "user", "content": block})
    return out


def _tool_prompt(messages: list[dict], tools: list[Tool] | None, kind: str) -> list[dict]:
    """The tools described in the system message (after the user's own, if any)."""
    if not tools:
        return messages
    if kind == "smollm2":
        prompt = SMOLLM2_PROMPT.format(tools=json.dumps([t.openai()["function"] for t in tools], ensure_ascii=False))
    else:
        prompt = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def writes_calls(chat_template: str | None) -> bool:
    """Whether a template writes an assistant message's `tool_calls` itself."""
    return "tool_calls" in (chat_template or "")


def _calls_as_text(message: dict, kind: str) -> dict:
    calls = [call_from_message(c) for c in message.get("tool_calls") or []]
    written = [call_text(c, kind) for c in calls] if kind != "smollm2" or not calls else [smollm2_block(calls)]
    content = "\n".join(filter(None, [message.get("content") or "", *written]))
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def _with_argument_objects(message: dict) -> dict:
    message = {**message, "content": message.get("content") or ""}  # templates concatenate it
    if not message.get("tool_calls"):
        return message
    # arguments that are not JSON stay a string, which the template writes as it is
    calls = [{**call, "function": {**(call.get("function") or {}), "arguments": call_from_message(call).argument_values()}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def call_from_message(call: dict) -> ToolCall:
    """An OpenAI history call (arguments as a JSON string or, as Ollama sends them, an object)."""
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    return ToolCall(function.get("name", ""), arguments if isinstance(arguments, str) else json.dumps(arguments))


def call_text(call: ToolCall, kind: str) -> str:
    """A call as the family writes it (for history turns and training data)."""
    arguments = call.argument_values()
    if kind == "llama3":
        return json.dumps({"name": call.name, "parameters": arguments}, ensure_ascii=False)
    if kind == "smollm2":
        return smollm2_block([call])
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{_HERMES_OPEN}\n{body}\n{_HERMES_CLOSE}"


def smollm2_block(calls: list[ToolCall]) -> str:
    """SmolLM2's one block for all of a turn's calls: a JSON list inside <tool_call></tool_call>."""
    items = [json.dumps({"name": c.name, "arguments": c.argument_values()}, ensure_ascii=False) for c in calls]
    return f"{_HERMES_OPEN}[\n" + ",\n".join(items) + f"\n]{_HERMES_CLOSE}"


# -- the grammar ------------------------------------------------------------------------------------


def tool_grammar(tools: list[Tool], choice: str, kind: str, parallel: bool = False,
                 special_tokens: dict[str, int] | None = None) -> str:
    """A lark grammar (llguidance's dialect) for the answer: text, calls, or either.

    special_tokens: text -> id of the tokenizer's special tokens; where `<tool_call>` is one (as in
    some vocabularies) the grammar asks for that token rather than its spelling."""
    chosen = [t for t in tools if choice in ("auto", "required", "none") or t.name == choice]
    key = "parameters" if kind == "llama3" else "arguments"
    bodies = [{"type": "object", "properties": {"name": {"const": t.name}, key: closed(t.parameters)},
               "required": ["name", key], "additionalProperties": False} for t in chosen]
    schema = {"anyOf": bodies, "x-guidance": _LAYOUT} if len(bodies) > 1 else {**bodies[0], "x-guidance": _LAYOUT}
    special = special_tokens or {}
    opener, closer = _lit(_HERMES_OPEN, special), _lit(_HERMES_CLOSE, special)
    prefix = r"\{" if kind == "llama3" else re.escape(_HERMES_OPEN)  # how a call opens: text may not
    if kind == "llama3":  # one JSON object
        calls = "calls: body"
    elif kind == "smollm2":  # one block holding a list
        calls = f'calls: {opener} "[\\n" body ' + ('(",\\n" body)* ' if parallel else "") + f'"\\n]" {closer}'
    else:
        block = f'{opener} "\\n" body "\\n" {closer}'
        calls = f'calls: {block} ("\\n" {block})*' if parallel else f"calls: {block}"
    rules = [f"body: %json {json.dumps(schema)}", calls, f"TEXT: /(.|\\n)+/ & ~/\\s*{prefix}(.|\\n)*/"]
    start = {"none": "start: TEXT", "auto": "start: TEXT | calls"}.get(choice, "start: calls")
    return "\n".join([start, *rules]) + "\n"


def closed(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties and does
    not say otherwise: a call the grammar writes still validates against the tool's own schema, and
    the model cannot invent keys until its budget ends (OpenAI's strict mode does the same)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _lit(text: str, special: dict[str, int]) -> str:
    return f"<[{special[text]}]>" if text in special else json.dumps(text)


# -- reading the answer -------------------------------------------------------------------------------


def parse_calls(text: str, kind: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an answer; content is None when the answer is only calls."""
    stripped = text.strip()
    if kind == "llama3":
        body = stripped.removeprefix("<|python_tag|>").strip()
        call = _read_call(_json(body), "parameters") if body.startswith("{") else None
        return (None, [call]) if call else (text or None, [])
    start = stripped.find(_HERMES_OPEN)
    if start < 0:
        return text or None, []
    calls = [c for body in _blocks(stripped, start) for c in _read_calls(body, "arguments")]
    content = stripped[:start].strip() or None
    return (content, calls) if calls else (text or None, [])


def _blocks(text: str, at: int) -> list:
    """The JSON value of each `<tool_call>` block from `at` on, read as JSON (an argument string may
    itself hold "</tool_call>"); an unfinished block ends the list."""
    decoder, out = json.JSONDecoder(), []
    while (at := text.find(_HERMES_OPEN, at)) >= 0:
        begin = at + len(_HERMES_OPEN)
        begin += len(text[begin:]) - len(text[begin:].lstrip())
        try:
            value, at = decoder.raw_decode(text, begin)
        except ValueError:
            break
        out.append(value)
    return out


def _read_calls(data, key: str) -> list[ToolCall]:
    """The calls in one block: an object, or a list of them (SmolLM2's)."""
    calls = [_read_call(d, key) for d in (data if isinstance(data, list) else [data])]
    return [c for c in calls if c]


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_call(data, key: str) -> ToolCall | None:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(key, data.get("arguments", data.get("parameters", {})))
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False), "call_" + uuid.uuid4().hex[:24])


def invalid_call(call: ToolCall, tools: list[Tool]) -> str | None:
    """Why a call does not fit the tools (unknown name, arguments not JSON or not valid), or None."""
    tool = next((t for t in tools if t.name == call.name), None)
    if tool is None:
        return f"no tool is named '{call.name}'"
    try:
        arguments = json.loads(call.arguments)
    except ValueError as error:
        return f"the arguments are not JSON: {error}"
    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as error:
        return f"the arguments do not validate: {error.message}"
    return None


class CallStream:
    """Splits a streamed answer into content deltas and whole calls as they complete.

    Text that could still be the start of a call is held back; the rest streams as content. Calls
    are given whole, each as soon as its block closes (llama3's single call at the end)."""

    def __init__(self, kind: str):
        self.kind, self.text = kind, ""
        self.sent = 0  # characters of `text` given out as content
        self.calls_at: int | None = None  # where the calls begin
        self.sent_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed now)."""
        self.text += delta
        content = self._content(final) if self.calls_at is None else ""
        if self.calls_at is None:
            return content, []
        tail = self.text[self.calls_at:]
        if not final:  # only closed blocks (llama3's call closes with the answer)
            end = tail.rfind(_HERMES_CLOSE) if self.kind != "llama3" else -1
            tail = tail[:end + len(_HERMES_CLOSE)] if end >= 0 else ""
        calls = parse_calls(tail, self.kind)[1] if tail else []
        new, self.sent_calls = calls[self.sent_calls:], max(self.sent_calls, len(calls))
        if final and not self.sent_calls:  # no valid call after all: it was text
            return content + self.text[self.calls_at:], []
        return content, new

    def _content(self, final: bool) -> str:
        """Content that can no longer be part of a call; finds where calls begin."""
        rest = self.text[self.sent:]
        if self.kind == "llama3":  # a call is the whole answer, so only the start can open one
            if self.sent == 0:
                head = rest.lstrip()
                if head.startswith(("{", "<|python_tag|>")):
                    self.calls_at = len(rest) - len(head)
                    return ""
                if not final and (not head or "<|python_tag|>".startswith(head)):
                    return ""
            self.sent = len(self.text)
            return rest
        at = rest.find(_HERMES_OPEN)
        if at >= 0:
            self.calls_at, self.sent = self.sent + at, self.sent + at
            return rest[:at].rstrip() if at else ""
        hold = 0 if final else next((k for k in range(min(len(rest), len(_HERMES_OPEN) - 1), 0, -1)
                                     if _HERMES_OPEN.startswith(rest[-k:])), 0)
        out = rest[:len(rest) - hold]
        self.sent += len(out)
        return out

"""Tool calling: the family formats, the grammar that keeps calls valid, parsing, fine-tuning data and
the server, driven by the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.data.sft import Example, encode, parse_row
from slmkit.errors import SlmError
from slmkit.generate import TextGenerator
from slmkit.infer.constrain import OutputFormat
from slmkit.infer.sampling import SamplingParams
from slmkit.toolcalls import (
    CallStream,
    ToolCall,
    ToolError,
    check_tool_history,
    invalid_call,
    parse_calls,
    read_tool_choice,
    read_tools,
    template_messages,
    tool_format,
    tool_grammar,
    writes_calls,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book", "description": "Book a table",
        "parameters": {"type": "object", "properties": {
            "people": {"type": "integer", "minimum": 1, "maximum": 20},
            "when": {"type": "object", "properties": {"day": {"enum": ["mon", "tue"]}, "hour": {"type": "integer",
                                                                                                  "minimum": 0, "maximum": 23}},
                     "required": ["day", "hour"], "additionalProperties": False}},
            "required": ["people", "when"], "additionalProperties": False}}},
]
CALL_HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "It is 3 degrees in Oslo."},
]


# -- definitions and their errors -------------------------------------------------------------------


@pytest.mark.parametrize("tools, path", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}], "tools[0].function.parameters.properties.a.type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ([TOOLS[0], TOOLS[0]], "tools[1].function.name"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
])
def test_a_bad_tool_is_refused_with_its_json_path(tools, path):
    with pytest.raises(ToolError) as error:
        read_tools(tools)
    assert error.value.path == path


def test_tool_choice_and_history_rules():
    tools = read_tools(TOOLS)
    assert [read_tool_choice(c, tools) for c in (None, "none", "required")] == ["auto", "none", "required"]
    assert read_tool_choice({"type": "function", "function": {"name": "book"}}, tools) == "book"
    with pytest.raises(ToolError, match="not among the tools"):
        read_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    check_tool_history(CALL_HISTORY)
    with pytest.raises(ToolError, match="answers no earlier"):
        check_tool_history([*CALL_HISTORY[:1], {"role": "tool", "tool_call_id": "x", "content": "1"}])


# -- the family formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [("qwen2.5", "hermes"), ("qwen3", "hermes"), ("llama3.2", "llama3"),
                                        ("smollm3", "hermes")])
def test_family_templates_render_tools_as_transformers_does(tiny_tokenizer, name, kind):
    """Our Jinja sandbox renders the tool prompt and a history with calls and results byte for byte
    as transformers' apply_chat_template does for the same template."""
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    template = (TEMPLATES / f"{name}.jinja").read_text()
    assert tool_format(template) == kind
    ours = replace(tiny_tokenizer, chat_template=template)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend, chat_template=template,
                                              bos_token=tiny_tokenizer.token(tiny_tokenizer.bos_token_id),
                                              eos_token=tiny_tokenizer.token(tiny_tokenizer.eos_token_id))
    tools = read_tools(TOOLS)
    messages, extra = template_messages(CALL_HISTORY[:3], tools, kind, writes_calls(template))
    expected = hf.apply_chat_template(messages, tools=extra["tools"], tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, **extra) == expected
    assert "get_weather" in expected and "Oslo" in expected and 'temp' in expected


def test_a_template_without_tools_gets_them_in_the_system_message(tiny_tokenizer):
    assert tool_format(tiny_tokenizer.chat_template) == "generic"
    messages, extra = template_messages(CALL_HISTORY, read_tools(TOOLS), "generic")
    assert extra == {} and messages[0]["role"] == "system" and '"name": "book"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                         '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>'}
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"temp": 3}\n</tool_response>'}
    tiny_tokenizer.apply_chat_template(messages)  # renders


@pytest.mark.parametrize("kind, text", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "book", "arguments": {"people": 2}}\n</tool_call>'),
    ("llama3", '<|python_tag|>{"name": "book", "parameters": {"people": 2}}'),
    ("smollm2", 'Sure.\n<tool_call>[\n{"name": "book", "arguments": {"people": 2}}\n]</tool_call>'),
])
def test_calls_are_parsed_whole_and_streamed(kind, text):
    content, calls = parse_calls(text, kind)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("book", {"people": 2})]
    assert content == (None if kind == "llama3" else "Sure.")
    stream, sent, streamed = CallStream(kind), "", []
    for i in range(0, len(text), 3):  # three characters at a time
        piece, new = stream.feed(text[i:i + 3])
        sent += piece
        streamed += new
    piece, new = stream.feed("", final=True)
    assert [(c.name, c.arguments) for c in streamed + new] == [(c.name, c.arguments) for c in calls]
    assert parse_calls("plain answer", kind) == ("plain answer", [])
    if kind != "llama3":  # a block is read as JSON: its strings may hold the closing tag
        tricky = text.replace('"people": 2', '"note": "}]</tool_call>"')
        assert json.loads(parse_calls(tricky, kind)[1][0].arguments) == {"note": "}]</tool_call>"}
    stream = CallStream(kind)
    assert stream.feed("plain ")[0] == "plain " and stream.feed("answer")[0] == "answer"


# -- the grammar ---------------------------------------------------------------------------------------


def _tool_answers(model, tokenizer, choice: str, kind: str, seeds=range(8)):
    gen = TextGenerator(model, tokenizer)
    fmt = OutputFormat("lark", lark=tool_grammar(read_tools(TOOLS), choice, kind))
    return [gen.complete(["Call a tool"], SamplingParams(max_new_tokens=120, temperature=1.0, seed=s),
                         output_format=fmt)[0] for s in seeds]


def test_smollm2_is_recognised_and_writes_all_calls_in_one_list(smollm):
    assert tool_format(smollm.tokenizer.chat_template) == "smollm2"
    calls = [ToolCall("book", '{"people": 2}'), ToolCall("get_weather", '{"city": "Oslo", "unit": "celsius"}')]
    messages, _ = template_messages([CALL_HISTORY[0], {"role": "assistant", "content": "", "tool_calls": [
        c.openai() for c in calls]}], read_tools(TOOLS), "smollm2")
    assert messages[0]["content"].startswith("You are an expert in composing functions.")
    block = messages[2]["content"]
    assert block.startswith("<tool_call>[\n") and block.endswith("\n]</tool_call>")
    assert [(c.name, c.arguments) for c in parse_calls(block, "smollm2")[1]] == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("kind", ["hermes", "llama3", "smollm2"])
def test_a_random_model_under_required_always_makes_a_valid_call(tiny_model, tiny_tokenizer, kind):
    gen = TextGenerator(tiny_model, tiny_tokenizer)
    free = gen.complete(["Call a tool"], SamplingParams(max_new_tokens=60, temperature=1.0, seed=0))[0].text
    assert parse_calls(free, kind)[1] == []  # the check below can fail: unconstrained, no call comes out
    tools = read_tools(TOOLS)
    for out in _tool_answers(tiny_model, tiny_tokenizer, "required", kind):
        assert out.finish_reason == "stop", out.text
        content, calls = parse_calls(out.text, kind)
        assert content is None and len(calls) == 1 and invalid_call(calls[0], tools) is None, out.text
    for out in _tool_answers(tiny_model, tiny_tokenizer, "book", kind, range(4)):
        assert [c.name for c in parse_calls(out.text, kind)[1]] == ["book"]


def test_auto_allows_text_or_a_call_and_none_never_a_call(tiny_model, tiny_tokenizer):
    tools = read_tools(TOOLS)
    for out in _tool_answers(tiny_model, tiny_tokenizer, "auto", "hermes", range(12)):
        content, calls = parse_calls(out.text, "hermes")
        assert calls or not out.text.lstrip().startswith("<tool_call>")
        assert all(invalid_call(c, tools) is None for c in calls)
    for out in _tool_answers(tiny_model, tiny_tokenizer, "none", "hermes", range(4)):
        assert parse_calls(out.text, "hermes")[1] == [] and "<tool_call>" not in out.text[:12]


def test_a_special_tool_call_token_is_asked_for_by_id():
    lark = tool_grammar(read_tools(TOOLS), "required", "hermes", special_tokens={"<tool_call>": 7, "</tool_call>": 8})
    assert "<[7]>" in lark and "<[8]>" in lark and '"<tool_call>"' not in lark


def test_invalid_call_names_the_problem():
    tools = read_tools(TOOLS)
    assert "no tool" in invalid_call(ToolCall("nope", "{}"), tools)
    assert "do not validate" in invalid_call(ToolCall("get_weather", '{"city": "Oslo"}'), tools)


# -- fine-tuning data ------------------------------------------------------------------------------------


def test_finetune_rows_with_tools_train_the_calls_not_the_results(tiny_tokenizer):
    example = parse_row({"messages": CALL_HISTORY, "tools": TOOLS}, "auto", "data.jsonl:1")
    assert isinstance(example, Example) and [t.name for t in example.tools] == ["get_weather", "book"]
    encoded = encode(example, tiny_tokenizer)
    trained = tiny_tokenizer.decode([i for i, t in zip(encoded.ids, encoded.trained) if t], skip_special=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in trained
    assert "It is 3 degrees" in trained and '{"temp": 3}' not in trained and "get_weather" in \
        tiny_tokenizer.decode(encoded.ids)
    with pytest.raises(SlmError, match=r"data.jsonl:2: tools\[0\]"):
        parse_row({"messages": CALL_HISTORY, "tools": [{"type": "x"}]}, "auto", "data.jsonl:2")
    with pytest.raises(SlmError, match="answers no earlier"):
        parse_row({"messages": [CALL_HISTORY[0], CALL_HISTORY[2], CALL_HISTORY[3]]}, "auto", "data.jsonl:3")


# -- the server ------------------------------------------------------------------------------------------


@pytest.fixture
def roomy_model():
    """A tiny random model with room for the tool listing (the tiny tokenizer spells it nearly byte by byte)."""
    from dataclasses import replace

    from slmkit.load import random_model
    from slmkit.presets import get_preset

    return random_model(replace(get_preset("tiny").config, max_position_embeddings=2048), seed=0)


@pytest.fixture
def tool_server(roomy_model, tiny_tokenizer):
    from serving import served

    from slmkit.serve.backend import LocalBackend

    with served({"tiny": LocalBackend("tiny", roomy_model, tiny_tokenizer)}) as srv:
        yield srv


def test_the_openai_client_gets_tool_calls_whole_and_streamed(tool_server):
    client, tools = tool_server.client(), read_tools(TOOLS)
    ask = {"model": "tiny", "messages": CALL_HISTORY[:1], "tools": TOOLS, "max_tokens": 120, "temperature": 0}
    answer = client.chat.completions.create(**ask, tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and invalid_call(ToolCall(call.function.name, call.function.arguments),
                                                        tools) is None
    deltas = [c.choices[0] for c in client.chat.completions.create(**ask, tool_choice="required", stream=True)
              if c.choices]
    streamed = [t for d in deltas for t in d.delta.tool_calls or []]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(0, call.function.name, call.function.arguments)]
    assert deltas[-1].finish_reason == "tool_calls"
    named = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "book"}})
    assert named.choices[0].message.tool_calls[0].function.name == "book"
    none = client.chat.completions.create(**ask, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    follow = client.chat.completions.create(**{**ask, "messages": CALL_HISTORY[:3]})  # a result in the history
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools[0].function.parameters.properties.a.type"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [CALL_HISTORY[0], CALL_HISTORY[2]]}, "messages[1].tool_call_id"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_get_a_400_naming_the_path(tool_server, change, param):
    import httpx

    body = {"model": "tiny", "messages": CALL_HISTORY[:1], "tools": TOOLS, "max_tokens": 8, **change}
    reply = httpx.post(tool_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_slm_chat_shows_calls_and_sends_results_back(roomy_model, tiny_tokenizer, tmp_path):
    import io

    from slmkit.chat import run_chat
    from slmkit.jobs.generate import read_tool_file
    from slmkit.toolcalls import ToolUse

    gen = TextGenerator(roomy_model, tiny_tokenizer)
    (tmp_path / "tools.json").write_text(json.dumps({"tools": TOOLS}))
    tools = read_tool_file(str(tmp_path / "tools.json"), "required")
    assert isinstance(tools, ToolUse) and tools.choice == "required"
    lines, out = iter(["Weather in Oslo?", "/result 3 degrees", "/exit"]), io.StringIO()
    run_chat(gen, SamplingParams(max_new_tokens=120, temperature=0), None, read=lambda _p: next(lines), out=out,
             tools=tools)
    shown = out.getvalue()
    assert shown.count("[call ") == 2 and "answer with /result" in shown  # the result got a (required) call back
    with pytest.raises(SlmError, match=r"--tools .*tools\[0\]"):
        (tmp_path / "bad.json").write_text('[{"type": "function"}]')
        read_tool_file(str(tmp_path / "bad.json"))

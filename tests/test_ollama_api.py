"""The Ollama API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`, `/api/show`,
`/api/version`) driven by the official `ollama` client: the same greedy answers as the OpenAI
routes, NDJSON streaming that adds up to the whole answer, Ollama's option names, and a 400 naming
any option this server does not implement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serving import served  # noqa: E402

from slmkit.infer.embed import Embedder  # noqa: E402
from slmkit.serve.backend import LocalBackend  # noqa: E402

ollama = pytest.importorskip("ollama")
GREEDY = {"temperature": 0, "num_predict": 12}
CHAT = [{"role": "user", "content": "Once upon a time"}]


def _server(tiny_model, tiny_tokenizer):
    return served({"tiny": LocalBackend("tiny", tiny_model, tiny_tokenizer)})


def test_the_ollama_client_chats_generates_streams_embeds_and_lists(tiny_model, tiny_tokenizer):
    with _server(tiny_model, tiny_tokenizer) as srv:
        client = ollama.Client(host=srv.url)
        openai_answer = srv.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                                             temperature=0).choices[0].message.content
        answer = client.chat(model="tiny", messages=CHAT, options=GREEDY)
        assert answer.message.content == openai_answer and answer.done and answer.eval_count >= 1
        streamed = "".join(part.message.content for part in client.chat(model="tiny", messages=CHAT, options=GREEDY,
                                                                        stream=True))
        assert streamed == openai_answer
        generated = client.generate(model="tiny", prompt="Once upon a time", options=GREEDY)
        assert generated.response == openai_answer  # through the chat template, as Ollama does
        raw = client.generate(model="tiny", prompt="Once upon a time", raw=True, options=GREEDY)
        plain = srv.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
        assert raw.response == plain.choices[0].text
        vectors = client.embed(model="tiny", input=["a robot", "42"]).embeddings
        want = Embedder(tiny_model, tiny_tokenizer).embed(["a robot", "42"]).vectors.numpy()
        assert np.allclose(np.array(vectors), want, atol=1e-5)
        assert [m.model for m in client.list().models] == ["tiny"]
        assert "im_start" in client.show("tiny").template
        assert httpx.get(srv.url + "/api/version", timeout=10).json()["version"]


def test_options_we_do_not_implement_are_refused_by_name(tiny_model, tiny_tokenizer):
    with _server(tiny_model, tiny_tokenizer) as srv:
        client = ollama.Client(host=srv.url)
        with pytest.raises(ollama.ResponseError, match="option mirostat is not implemented"):
            client.chat(model="tiny", messages=CHAT, options={"mirostat": 1})
        with pytest.raises(ollama.ResponseError, match="not found"):
            client.chat(model="nope", messages=CHAT)
        r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "a", "images": ["x"]}, timeout=10)
        assert r.status_code == 400 and r.json() == {"error": "field images is not supported by this server; leave it out"}
        json_mode = client.chat(model="tiny", messages=CHAT, format="json", options={"temperature": 0, "num_predict": 40})
        assert json_mode.message.content.lstrip().startswith(("{", "["))


# As the ollama client sends it (its models keep only type, description and enum of a property, and put
# `required` first), so the OpenAI route gets the same prompt.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Paris"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
WEATHER = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
def roomy_server(tiny_tokenizer):
    """A tiny random model with room for the tool listing (the tiny tokenizer spells it nearly byte by byte)."""
    from dataclasses import replace

    from slmkit.load import random_model
    from slmkit.presets import get_preset

    model = random_model(replace(get_preset("tiny").config, max_position_embeddings=2048), seed=0)
    # No prefix cache or speculation: a prompt read from a cached prefix, or positions verified together,
    # round differently, and a seeded draw at temperature 1 on a random model can land on either side.
    with served({"tiny": LocalBackend("tiny", model, tiny_tokenizer, prefix_cache_mb=0, lookup_tokens=0)}) as srv:
        yield srv


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, dict(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_ollama_client_gets_the_tool_calls_the_openai_route_makes(roomy_server, choice, monkeypatch):
    """Tools through /api/chat: the same calls and text as the OpenAI route for the same seed, arguments
    as objects, streamed calls equal to the whole answer's. Ollama has no tool_choice (it is `auto`);
    a random model under `auto` answers in text, so the call path is also run with the server's choice
    set to `required`."""
    from slmkit.serve import ollama_api
    from slmkit.toolcalls import ToolUse

    monkeypatch.setattr(ollama_api, "ToolUse", lambda tools: ToolUse(tools, choice))
    client, openai_client = ollama.Client(host=roomy_server.url), roomy_server.client()
    for seed in range(3):
        expected = openai_client.chat.completions.create(model="tiny", messages=WEATHER, tools=TOOLS, max_tokens=160,
                                                         temperature=1.0, seed=seed, tool_choice=choice)
        message = expected.choices[0].message
        want = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        assert bool(want) == (choice == "required")
        options = {"temperature": 1.0, "seed": seed, "num_predict": 160}
        answer = client.chat(model="tiny", messages=WEATHER, tools=TOOLS, options=options)
        assert _calls(answer.message) == want and answer.message.content.strip() == (message.content or "").strip()
        parts = list(client.chat(model="tiny", messages=WEATHER, tools=TOOLS, options=options, stream=True))
        assert [call for part in parts for call in _calls(part.message)] == want
        assert "".join(part.message.content for part in parts).strip() == answer.message.content.strip()


def test_ollama_tool_history_and_its_errors(roomy_server):
    client = ollama.Client(host=roomy_server.url)
    history = WEATHER + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "content": '{"temp": 3}', "tool_name": "get_weather"}]
    answer = client.chat(model="tiny", messages=history, tools=TOOLS, options={"temperature": 0, "num_predict": 8})
    assert answer.done
    url = roomy_server.url + "/api/chat"
    orphan = {"model": "tiny", "messages": [WEATHER[0], history[2]], "tools": TOOLS, "stream": False}
    r = httpx.post(url, json=orphan, timeout=30)
    assert r.status_code == 400 and "messages[1]" in r.json()["error"]
    bad = {"model": "tiny", "messages": WEATHER, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}
    r = httpx.post(url, json=bad, timeout=30)
    assert r.status_code == 400 and "tools[0].function.name" in r.json()["error"]
    assert "tools" in client.show("tiny").capabilities

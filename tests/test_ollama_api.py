"""The Ollama API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`, `/api/show`,
`/api/version`) driven by the official `ollama` client: the same greedy answers as the OpenAI
routes, NDJSON streaming that adds up to the whole answer, Ollama's option names, and a 400 naming
any option this server does not implement."""

from __future__ import annotations

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

"""The server on the llama.cpp engine: the same scheduler and API, one llama.cpp sequence per row."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from conftest import LLAMA_CPP_MISSING

openai = pytest.importorskip("openai")
llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
if not llamacpp.available():
    pytest.skip(LLAMA_CPP_MISSING, allow_module_level=True)

from serving import disconnect_mid_stream, served  # noqa: E402

from slmkit.generate import TextGenerator  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.serve.backend import LocalBackend  # noqa: E402
from slmkit.serve.runners import LlamaCppRunner  # noqa: E402

QUESTION = [{"role": "user", "content": "Give me three tips for staying healthy."}]


@pytest.fixture(scope="module")
def files():
    files = llamacpp.runtime_files("smollm2-135m-instruct", progress=lambda _: None)  # the bundled GGUF, as it is
    return files.gguf, files.config, files.tokenizer


@pytest.fixture(scope="module")
def server(files):
    gguf, config, tokenizer = files
    engine = llamacpp.LlamaCppEngine(gguf, config, 1024, sequences=4)
    backend = LocalBackend("smollm2", LlamaCppRunner(engine), tokenizer, max_batch=4, context=1024)
    with served({"smollm2": backend}, timeout=120) as srv:
        srv.backend = backend
        yield srv


def test_answers_equal_the_llama_cpp_generator_alone_and_in_a_batch(server, files):
    gguf, config, tokenizer = files
    alone = TextGenerator(None, tokenizer, engine=llamacpp.LlamaCppEngine(gguf, config, 1024))
    client = server.client()
    prompts = [f"Write one sentence about the number {i}." for i in range(4)]
    expected = [alone.chat([{"role": "user", "content": p}], SamplingParams(max_new_tokens=16)).text for p in prompts]

    def ask(prompt):
        return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=16, temperature=0).choices[0].message.content

    before = server.backend.scheduler.steps
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == expected
    assert server.backend.scheduler.steps - before < 4 * 16  # rows shared decode steps


def test_streaming_logprobs_and_structured_output(server):
    client = server.client()
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=2)
    pieces, logprobs = [], []
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            logprobs += c.logprobs.content if c.logprobs and c.logprobs.content else []
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(logprobs) == 12 and all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in logprobs)
    schema = {"type": "object", "properties": {"tips": {"type": "array", "items": {"type": "string"},
                                                         "maxItems": 3}}, "required": ["tips"],
              "additionalProperties": False}
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=120, temperature=0,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "tips", "schema": schema}})
    assert list(json.loads(answer.choices[0].message.content)) == ["tips"]
    echo = client.completions.create(model="smollm2", prompt="The cat sat on the", max_tokens=0, echo=True,
                                     logprobs=0)
    assert echo.choices[0].logprobs.token_logprobs[0] is None and len(echo.choices[0].logprobs.tokens) > 3


def test_a_client_that_disconnects_frees_its_llama_cpp_sequence(server):
    assert disconnect_mid_stream(server) == 0
    assert sorted(server.backend.scheduler.runner.free) == [0, 1, 2, 3]

"""The hybrid router: two slmkit servers on loopback, a tiny random model as "local" and
SmolLM2-135M as "remote"; routing decisions, fallback when the remote is down or silent, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from serving import Server, served, smollm2_backend  # noqa: E402

from slmkit.serve.app import create_app  # noqa: E402
from slmkit.serve.backend import LocalBackend  # noqa: E402
from slmkit.serve.remote import RemoteBackend  # noqa: E402
from slmkit.serve.router import Router  # noqa: E402


@pytest.fixture(scope="module")
def remote_server():
    with served({"smollm2": smollm2_backend()}) as srv:
        yield srv


@pytest.fixture(scope="module")
def local_backend(tiny_tokenizer):
    from slmkit.load import random_model
    from slmkit.presets import get_preset

    backend = LocalBackend("tiny", random_model(get_preset("tiny").config, seed=0), tiny_tokenizer)
    yield backend
    backend.close()


def routed(local, remote_url, **policy):
    router = Router(local, RemoteBackend(remote_url, "smollm2", timeout=policy.pop("timeout", 30)), **policy)
    return Server(create_app({"auto": router, "tiny": local}, timeout=60))


def ask(srv, content, **kw):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": content}], max_tokens=kw.pop("max_tokens", 8),
        temperature=0, **kw)
    answer = raw.parse()
    return answer, raw.headers, answer.model_extra["slmkit_route"]


def test_confidence_policy_keeps_confident_drafts_and_escalates_the_rest(local_backend, remote_server):
    keep = routed(local_backend, remote_server.url, policy="confidence", threshold=-1000.0, draft_tokens=4)
    escalate = routed(local_backend, remote_server.url, policy="confidence", threshold=0.5, draft_tokens=4)
    try:
        answer, headers, route = ask(keep, "Tell me a story.")
        assert route["decision"] == "local" and answer.model == "tiny" and headers["x-slmkit-route"] == "local"
        assert route["confidence"] < 0 and not route["fallback"]
        answer, headers, route = ask(escalate, "Tell me a story.")
        assert route["decision"] == "remote" and answer.model == "smollm2" and headers["x-slmkit-model"] == "smollm2"
        assert answer.choices[0].message.content  # SmolLM2 answered
        metrics = httpx.get(escalate.url + "/metrics").text
        assert 'slmkit_router_decisions_total{decision="remote",reason="confidence ' in metrics
    finally:
        keep.stop()
        escalate.stop()


def test_keyword_and_length_policies(local_backend, remote_server):
    keyword = routed(local_backend, remote_server.url, policy="keyword")
    length = routed(local_backend, remote_server.url, policy="length")
    try:
        assert ask(keyword, "What is 12 + 30?")[2]["reason"] == "keyword: math"
        assert ask(keyword, "Write a python function that adds two numbers.")[2]["decision"] == "remote"
        assert ask(keyword, "Tell me about cats.")[2]["decision"] == "local"
        assert ask(length, "Tell me about cats.")[2]["decision"] == "local"
        long_prompt = "cats and dogs " * 200  # beyond the tiny model's 256-token context
        answer, _, route = ask(length, long_prompt)
        assert route == {"decision": "remote", "reason": "prompt longer than the local context",
                         "confidence": None, "fallback": False}
    finally:
        keyword.stop()
        length.stop()


def test_streaming_through_the_router(local_backend, remote_server):
    srv = routed(local_backend, remote_server.url, policy="always-remote")
    try:
        body = {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.headers["x-slmkit-route"] == "remote"
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[5:]) for line in lines[:-1]]
        assert all(c["model"] == "smollm2" and c["slmkit_route"]["decision"] == "remote" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finally:
        srv.stop()


def test_falls_back_to_local_when_the_remote_is_down_or_silent(local_backend):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    down = routed(local_backend, dead, policy="always-remote")
    slow = routed(local_backend, f"http://127.0.0.1:{silent.getsockname()[1]}", policy="always-remote", timeout=1.5)
    try:
        answer, headers, route = ask(down, "Hello?")
        assert route["decision"] == "local" and route["fallback"] and "remote failed" in route["reason"]
        assert answer.model == "tiny" and headers["x-slmkit-model"] == "tiny"
        started = time.perf_counter()
        answer, _, route = ask(slow, "Hello?")
        assert route["fallback"] and time.perf_counter() - started < 10
        metrics = httpx.get(down.url + "/metrics").text
        assert 'slmkit_router_decisions_total{decision="local",reason="fallback"} 1.0' in metrics
    finally:
        down.stop()
        slow.stop()
        silent.close()


def test_always_local_refuses_what_does_not_fit(local_backend, remote_server):
    srv = routed(local_backend, remote_server.url, policy="always-local")
    try:
        with pytest.raises(openai.BadRequestError, match="context"):
            ask(srv, "cats and dogs " * 200)
    finally:
        srv.stop()


@pytest.mark.slow  # kept out of `make test` for its 15-minute budget; `make bench` runs it
def test_route_eval_curve_runs_from_all_local_to_all_remote(local_backend, remote_server, data_dir, tmp_path):
    from slmkit.evals.endpoint import EndpointLM
    from slmkit.evals.lm import LocalLM
    from slmkit.evals.tasks import make_task
    from slmkit.serve.route_eval import route_eval, save

    local = LocalLM(local_backend.scheduler.runner.model, local_backend.tokenizer)
    remote = EndpointLM(remote_server.url + "/v1", model="smollm2")
    result = route_eval(local, remote, make_task("arc_easy", data_dir / "eval"), 12, [-1e9, -3.0, 1e9],
                        progress=False)
    first, _, last = result["curve"]
    assert first == {"threshold": -1e9, "escalated": 0.0, "accuracy": result["local_only"]}
    assert last == {"threshold": 1e9, "escalated": 1.0, "accuracy": result["remote_only"]}
    assert result["n"] == 12 and result["oracle"] >= max(result["local_only"], result["remote_only"])
    path, png = save(result, tmp_path, "tiny", "smollm2")
    assert png.stat().st_size > 5000 and path.is_file()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--route", "local=tiny"], "needs both"),
    (["serve", "--route", "local=tiny", "--route", "remote=ftp://x"], "http(s) URL"),
    (["serve", "--route", "middle=tiny"], "expected local=MODEL"),
    (["serve", "a=tiny", "a=tiny-moe"], "would be called 'a'"),
    (["serve", "--route", "local=tiny", "--route", "remote=http://127.0.0.1:9/v1", "--policy", "coin"],
     "routing policy 'coin' is unknown"),
])
def test_bad_serve_arguments_fail_before_serving(argv, message, capsys):
    from slmkit.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_remote_requests_carry_penalties_bias_and_structured_output():
    from slmkit.infer.constrain import OutputFormat
    from slmkit.infer.sampling import SamplingParams
    from slmkit.serve.backend import Prompt, Settings
    from slmkit.serve.remote import RemoteRun

    remote = RemoteBackend("http://127.0.0.1:9/v1", "big")
    chat = Prompt(messages=[{"role": "user", "content": "hi"}])
    schema = {"type": "object"}
    settings = Settings(8, SamplingParams(frequency_penalty=0.5, logit_bias={7: -100.0}),
                        output_format=OutputFormat("json_schema", schema=schema))
    path, body = RemoteRun(remote, chat, settings)._request()
    assert path == "/chat/completions" and body["frequency_penalty"] == 0.5 and body["logit_bias"] == {"7": -100.0}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    labels = Settings(8, output_format=OutputFormat("choices", choices=("yes", "no")))
    assert RemoteRun(remote, chat, labels)._request()[1]["guided_choice"] == ["yes", "no"]
    assert "response_format" not in RemoteRun(remote, chat, Settings(8))._request()[1]


def test_route_specs_name_the_local_model_as_slm_serve_does():
    """`--route local=NAME=MODEL` names the local side with the rule of `slm serve NAME=MODEL` (one function)."""
    from types import SimpleNamespace

    from slmkit.errors import SlmError
    from slmkit.serve.backend import parse_model_specs
    from slmkit.serve.config import RouterConfig
    from slmkit.serve.router import build_router

    assert parse_model_specs(["fast=tiny", "models/x.gguf"]) == {"fast": "tiny", "x": "models/x.gguf"}
    with pytest.raises(SlmError, match="'auto'"):
        parse_model_specs(["auto=tiny"])
    cfg = RouterConfig(route=["local=fast=tiny", "remote=http://127.0.0.1:9/v1,model=big"], remote_timeout=5,
                       policy="keyword", threshold=-1.0, draft_tokens=8)
    router = build_router(cfg, lambda name, model: SimpleNamespace(name=name, model=model))
    assert {name: b.model for name, b in router.local_backends().items()} == {"fast": "tiny"}
    assert router.remote.model == "big"

"""A uvicorn server in a thread on a free loopback port, for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import openai
import uvicorn


class Server:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def served(backends: dict, **app_options):
    """A running server for `backends` (name -> backend); stopped and the backends closed after."""
    from slmkit.serve.app import create_app

    srv = Server(create_app(backends, **app_options))
    try:
        yield srv
    finally:
        srv.stop()
        for backend in backends.values():
            backend.close()


def smollm2_backend(name: str = "smollm2"):
    """The bundled SmolLM2-135M-Instruct (bf16: fast to load) behind a continuous-batching scheduler."""
    import torch

    from slmkit.load import load
    from slmkit.serve.backend import LocalBackend

    smol = load("smollm2-135m-instruct", dtype=torch.bfloat16)
    return LocalBackend(name, smol.model, smol.tokenizer)


def disconnect_mid_stream(server, deadline_s: float = 20) -> int:
    """Start a long streamed completion, drop the connection after its first line, and return how
    many rows the scheduler still runs once it has had `deadline_s` to notice (0 when freed)."""
    import httpx

    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + deadline_s
    while server.backend.scheduler.active and time.time() < deadline:
        time.sleep(0.05)
    return server.backend.scheduler.active

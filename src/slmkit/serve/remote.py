"""A model behind another OpenAI-compatible server, as a backend (the router's larger model).

Requests are streamed (httpx) and the server-sent chunks turned into the same `Event`s a local
model emits, so the HTTP layer does not care which side answered. Any failure (connection refused,
HTTP error, malformed chunk, no first byte within `timeout` seconds) raises `RemoteFailed`,
which the router answers by falling back to the local model.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

import httpx

from slmkit.errors import SlmError
from slmkit.serve.backend import Prompt, Settings
from slmkit.serve.scheduler import Event, TokenInfo


class RemoteFailed(Exception):
    """The remote model could not answer (the reason is the message)."""


class RemoteBackend:
    def __init__(self, url: str, model: str | None = None, key_env: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model, self.timeout = model, timeout
        self.key = os.environ.get(key_env) if key_env else None
        if key_env and not self.key:
            raise SlmError(f"the remote's API key variable ${key_env} is not set")
        self.name = model or "remote"

    @classmethod
    def from_spec(cls, spec: str, timeout: float = 60.0) -> RemoteBackend:
        """"URL[,model=NAME,key=ENV_VAR]" -> a backend."""
        url, *options = spec.split(",")
        fields = dict(o.split("=", 1) for o in options if "=" in o)
        unknown = set(fields) - {"model", "key"}
        if unknown or not url.startswith(("http://", "https://")):
            raise SlmError(f"--route remote={spec}: expected URL[,model=NAME,key=ENV_VAR] with an http(s) URL")
        return cls(url, fields.get("model"), fields.get("key"), timeout)

    def start(self, prompt: Prompt, settings: Settings) -> RemoteRun:
        return RemoteRun(self, prompt, settings)


class RemoteRun:
    """One prompt's choices on the remote model (run by the router, which reports usage and route)."""

    def __init__(self, backend: RemoteBackend, prompt: Prompt, settings: Settings):
        self.backend, self.prompt, self.settings = backend, prompt, settings
        self.answered_by = backend.name  # the remote's own name for its model, once its first chunk says

    def _request(self) -> tuple[str, dict]:
        s, p, chat = self.settings, self.settings.sampling, self.prompt.messages is not None
        body = {"model": self.backend.model or "default", "stream": True, "temperature": p.temperature,
                "top_p": p.top_p, "n": s.n, "stop": p.stop or None, "seed": p.seed}
        if p.frequency_penalty or p.presence_penalty:
            body.update(frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty)
        if p.logit_bias:  # token ids as the client sent them: the remote's own tokenizer reads them
            body["logit_bias"] = {str(t): b for t, b in p.logit_bias.items()}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        body.update(_format_fields(s.output_format))
        if chat:
            body["messages"] = self.prompt.messages
            body["stream_options"] = {"include_usage": True}
        else:
            body["prompt"] = self.prompt.text if self.prompt.token_ids is None else self.prompt.token_ids
        return ("/chat/completions" if chat else "/completions"), body

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        path, body = self._request()
        headers = {"Authorization": f"Bearer {self.backend.key}"} if self.backend.key else {}
        timeout = httpx.Timeout(self.backend.timeout, connect=min(5.0, self.backend.timeout))
        counts: dict[int, int] = {}
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", self.backend.url + path, json=body, headers=headers) as response:
                    if response.status_code != 200:
                        detail = (await response.aread()).decode("utf-8", "replace")[:300]
                        raise RemoteFailed(f"the remote answered HTTP {response.status_code}: {detail}")
                    async for index, event in self._parse(response, counts):
                        yield index, event
        except httpx.HTTPError as error:
            raise RemoteFailed(f"the remote could not be reached: {type(error).__name__}: {error}") from None

    async def _parse(self, response: httpx.Response, counts: dict[int, int]):
        lines = response.aiter_lines()
        deadline = time.monotonic() + self.settings.timeout
        while True:
            wait = min(self.backend.timeout, deadline - time.monotonic())
            try:  # never wait on the remote past its own timeout or the request's
                line = await asyncio.wait_for(anext(lines), timeout=max(wait, 0.01))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RemoteFailed(f"the remote sent nothing for {wait:.0f} s") from None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise RemoteFailed(f"the remote sent a malformed chunk: {data[:100]}") from None
            if "error" in chunk:
                raise RemoteFailed(f"the remote failed: {chunk['error'].get('message')}")
            if chunk.get("model"):
                self.answered_by = chunk["model"]
            for choice in chunk.get("choices", []):
                index = choice.get("index", 0)
                text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    counts[index] = counts.get(index, 0) + 1
                    yield index, Event("text", text=text, tokens=[TokenInfo(-1, text, float("nan"), None)])
                if choice.get("finish_reason"):
                    yield index, Event("done", finish_reason=choice["finish_reason"], completion_tokens=counts.get(index, 0))

    async def aclose(self) -> None:
        pass


def _format_fields(fmt) -> dict:
    """The request fields that ask a remote server for the same structured output."""
    if fmt is None:
        return {}
    if fmt.kind == "choices":
        return {"guided_choice": list(fmt.choices)}  # vLLM's (and slmkit's) field
    if fmt.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema}}}

"""What the server asks of a model: generate choices for a prompt and stream back events.

`LocalBackend` runs an slmkit model through the continuous-batching `Scheduler`; the router's
remote side (`slmkit.serve.router.RemoteBackend`) speaks to another OpenAI-compatible server.
Both yield `(choice index, Event)` pairs, so the HTTP layer formats answers the same way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from slmkit.data.sft import render_chat
from slmkit.errors import SlmError
from slmkit.generate import stop_token_ids, tool_output_format
from slmkit.infer.constrain import Grammar, OutputFormat
from slmkit.infer.embed import Embedder, Embeddings
from slmkit.infer.llamacpp import LlamaCppEmbedder
from slmkit.infer.sampling import SamplingParams
from slmkit.presets import DEFAULT_MODEL
from slmkit.serve.config import LOOKUP_TOKENS, PREFIX_CACHE_MB
from slmkit.serve.protocol import ApiError
from slmkit.serve.scheduler import Event, Job, QueueFull, Scheduler
from slmkit.toolcalls import ToolUse, tool_format

RETRY_AFTER_S = 2


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """["NAME=MODEL" or "MODEL", ...] -> {name: model}; a bare MODEL is named after its file or preset.

    The names of local backends, for `slm serve` and the router's local side ("auto" is the router's)."""
    out: dict[str, str] = {}
    for spec in specs or [DEFAULT_MODEL]:
        name, _, model = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        name = name or Path(model.rstrip("/")).name.removesuffix(".gguf")
        if name in out or name == "auto":
            raise SlmError(f"two served models would be called '{name}'; name them: slm serve NAME=MODEL ...")
        out[name] = model
    return out


@dataclass
class Settings:
    """One request: how its tokens are chosen (`sampling`, the one sampling type; its max_new_tokens
    is set per prompt from `max_tokens` and the room left in the context) and what the server does
    around them."""

    max_tokens: int | None  # None: as many as fit in the context
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))  # OpenAI's default
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs
    echo: bool = False  # completions: the answer text starts with the prompt (and logprobs cover it)
    timeout: float = 600.0
    output_format: OutputFormat | None = None  # JSON / JSON Schema / one of a set of labels


@dataclass
class Prompt:
    """A prompt as text (a completion) or as chat messages (with tools), rendered by whoever runs it."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict] | None = None
    tools: ToolUse | None = None


class LocalBackend:
    def __init__(self, name: str, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, prefix_cache_mb: float = PREFIX_CACHE_MB,
                 lookup_tokens: int = LOOKUP_TOKENS):
        if tokenizer is None:
            raise SlmError(f"model '{name}' has no tokenizer; serving needs one")
        self.name, self.tokenizer = name, tokenizer
        self.stop_ids = stop_token_ids(model.config, tokenizer)
        self.scheduler = Scheduler(model, tokenizer, max_batch, max_queue, context, self.stop_ids, prefix_cache_mb,
                                   lookup_tokens)
        self.context = self.scheduler.context
        self.tool_format = tool_format(tokenizer.chat_template)  # hermes | llama3 | smollm2 | generic
        self._embedder: Embedder | None = None
        self._embed_lock = threading.Lock()

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            vocab = self.scheduler.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt.token_ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(prompt.token_ids)
        if prompt.messages is not None:
            if not self.tokenizer.chat_template:
                raise ApiError(400, f"model '{self.name}' has no chat template; use /v1/completions", param="model")
            try:  # as `slm chat` renders it, and as `slm finetune` trains a chat with tools
                text = render_chat(self.tokenizer, prompt.messages, True, prompt.tools and prompt.tools.tools)
            except SlmError as error:
                raise ApiError(400, f"model '{self.name}': {error}", param="messages") from None
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(prompt.text or "")

    def check(self, ids: list[int], settings: Settings) -> int:
        """The max_tokens to use (default: what fits); a 400 when the request cannot fit."""
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        try:  # the sampler's own check, answered as a 400
            settings.sampling.check_vocab(self.scheduler.config.vocab_size)
        except SlmError as error:
            raise ApiError(400, str(error), param="logit_bias") from None
        max_tokens = self.context - len(ids) if settings.max_tokens is None else settings.max_tokens
        try:
            self.scheduler.check(len(ids), max_tokens)
        except SlmError as error:
            raise ApiError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
        return max_tokens

    def grammar(self, fmt: OutputFormat | None) -> Grammar | None:
        """The output format compiled for this model's tokens; a 400 when it cannot be."""
        if fmt is None:
            return None
        try:
            return Grammar(fmt, self.tokenizer, self.scheduler.config.vocab_size, self.stop_ids)
        except SlmError as error:
            raise ApiError(400, str(error), param="guided_choice" if fmt.kind == "choices" else "response_format") from None

    def start(self, prompt: Prompt, settings: Settings) -> LocalRun:
        """Validate and encode now (so errors come before any streaming); generate when iterated."""
        ids = self.encode(prompt)
        max_tokens = self.check(ids, settings)
        fmt = settings.output_format
        if prompt.tools:
            if fmt is not None:
                raise ApiError(400, "give either tools or a response_format, not both", param="response_format")
            fmt = tool_output_format(self.tokenizer, prompt.tools)
        return LocalRun(self, ids, max_tokens, settings, prompt.text or "", self.grammar(fmt),
                        self.tool_format if prompt.tools else None)

    def embed(self, texts: list[str], ids: list[list[int]], dimensions: int | None = None) -> Embeddings:
        """Vectors of texts (or token ids) from the served weights (`slmkit.infer.embed`, or llama.cpp's
        embeddings mode); one call at a time (the decode loop runs beside it: neither touches the
        other's KV cache)."""
        runner = self.scheduler.runner
        if self._embedder is None:  # the served weights: slmkit's model, or llama.cpp's (a context of its own)
            self._embedder = (Embedder(runner.model, self.tokenizer, context=self.context) if hasattr(runner, "model")
                              else LlamaCppEmbedder(runner.engine, self.tokenizer, context=self.context))
        if dimensions not in (None, self._embedder.dimensions):
            raise ApiError(400, f"dimensions {dimensions} is not supported: this model's embeddings have "
                           f"{self._embedder.dimensions} (leave dimensions out)", param="dimensions")
        try:
            with self._embed_lock:
                return self._embedder.embed_ids(ids or self._embedder.encode(texts))
        except SlmError as error:
            raise ApiError(400, str(error), param="input") from None

    def close(self) -> None:
        self.scheduler.close()


def _forward(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))
    return emit


class LocalRun:
    """One prompt's choices on a local model; iterate `events()` once."""

    route: dict | None = None  # set by the router

    def __init__(self, backend: LocalBackend, ids: list[int], max_tokens: int, settings: Settings, prompt_text: str,
                 grammar: Grammar | None = None, tool_format: str | None = None):
        """tool_format: the call format to read the answer with, when the chat has tools."""
        self.backend, self.ids, self.max_tokens, self.settings = backend, ids, max_tokens, settings
        self.grammar, self.tool_format = grammar, tool_format
        self.prompt_text, self.answered_by = prompt_text, backend.name
        self.jobs: list[Job] = []

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Events for every choice, as they come; ends when each choice is done (or failed)."""
        settings, loop = self.settings, asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + settings.timeout
        params = replace(settings.sampling, max_new_tokens=max(1, self.max_tokens))
        for index in range(settings.n):  # choice i of a seeded request uses seed + i: different, reproducible
            seeded = params if params.seed is None else replace(params, seed=params.seed + index)
            self.jobs.append(Job(self.ids, self.max_tokens, seeded, _forward(loop, queue, index), params.stop,
                                 settings.top_logprobs, settings.echo and settings.top_logprobs is not None,
                                 deadline, matcher=self.grammar.matcher(self.max_tokens) if self.grammar else None))
        try:
            self.backend.scheduler.submit(self.jobs)
        except QueueFull as error:
            raise ApiError(429, str(error), type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        open_choices = settings.n
        # the scheduler ends late jobs itself; this is a guard (one timer for the whole answer: a
        # wait_for per event would cost a task and a timer at every token of every stream)
        guard = loop.time() + max(deadline - time.monotonic() + 5, 0.1)
        try:
            while open_choices:
                try:
                    async with asyncio.timeout_at(guard):
                        index, event = await queue.get()
                except TimeoutError:
                    raise ApiError(504, "the request timed out", type="timeout", code="timeout") from None
                if event.kind in ("done", "error"):
                    open_choices -= 1
                yield index, event
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Free the scheduler slots of unfinished choices (a client went away, or an error)."""
        for job in self.jobs:
            job.cancel()

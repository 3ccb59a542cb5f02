"""Continuous batching: one thread owns a model and decodes every active request in shared steps.

Requests wait in a bounded queue; between decode steps, waiting requests are prefilled (one at a
time, each alone) and join the batch, and finished, cancelled or timed-out ones leave it. Every
request gets its own sampling settings and random generator, so a seeded request samples the same
tokens whatever else shares its steps (greedy ones are also bit-for-bit what `Engine` produces,
up to the reduction order of batched matmuls).

Callers receive `Event`s through the `emit` callback they pass in, called from the scheduler
thread (the server forwards them into its event loop).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmkit.errors import SlmError
from slmkit.generate import TextStream
from slmkit.infer.engine import default_cache_dtype
from slmkit.infer.sampling import SamplingParams, count_tokens, make_generator, sample
from slmkit.layers import prepare_for_cpu_inference
from slmkit.serve.batch import BatchCache
from slmkit.tokenizer import Tokenizer


class QueueFull(SlmError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class TokenInfo:
    token: int
    text: str  # the token's own text (for logprobs tables)
    logprob: float
    top: dict[str, float] | None  # the `top_logprobs` most likely tokens, when asked for


@dataclass
class Event:
    kind: str  # "prompt" (echoed prompt logprobs), "text" (new text and the tokens behind it), "done", "error"
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


@dataclass
class Job:
    """One sequence to generate (a request with n > 1 submits n jobs)."""

    prompt: list[int]
    max_tokens: int  # 0 with echo_logprobs: score the prompt only
    params: SamplingParams  # temperature, top_p, seed, stop ids (its max_new_tokens is not used)
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token and k alternatives
    echo_logprobs: bool = False  # also score the prompt's tokens (completions with echo)
    deadline: float | None = None  # time.monotonic() after which the job ends with finish_reason "timeout"
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this job at the next step (a client went away)."""
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    stream: TextStream
    generator: torch.Generator
    position: int  # RoPE position of the token fed at the next step (= tokens so far)
    logits: torch.Tensor  # (V,) logits for the next token
    last: int = -1  # the token fed at the next step
    generated: int = 0
    finish_reason: str | None = None
    pending: list[TokenInfo] = field(default_factory=list)  # tokens whose text the stream holds back
    history: list[int] = field(default_factory=list)  # prompt + generated ids (the repetition penalty's)
    counts: torch.Tensor | None = None  # (1, V) generated-token counts (frequency/presence penalties)


class Scheduler:
    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, stop_ids: list[int] = ()):
        self.model = prepare_for_cpu_inference(model.eval())
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.stop_ids = set(stop_ids)
        self.cache_dtype = default_cache_dtype(model)
        self.batch = BatchCache(self.model, self.cache_dtype)
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.steps = 0  # decode steps run (for metrics and tests)
        self.max_rows_seen = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="slmkit-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); raises QueueFull when they do not fit in the queue."""
        for job in jobs:
            self.check(len(job.prompt), job.max_tokens)
        with self.lock:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue}); "
                                "retry shortly")
            self.waiting.extend(jobs)
            self.lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()
        self._thread.join(timeout=10)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """An SlmError naming the problem when a job of this size cannot run."""
        if not prompt_tokens:
            raise SlmError("the prompt is empty")
        if max_tokens < 0:
            raise SlmError("max_tokens must be >= 0")
        if prompt_tokens + max_tokens > self.context:
            raise SlmError(f"this model's context is {self.context} tokens; the prompt has {prompt_tokens} and "
                           f"max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens.")

    # -- the scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stopping and not self.waiting and not self.rows:
                    self.lock.wait()
                if self._stopping:
                    break
                joining = []
                while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            with torch.inference_mode():
                for job in joining:
                    try:
                        self._join(job)
                    except Exception as error:  # a request that fails must not take the others down
                        job.emit(Event("error", message=f"generation failed: {error}"))
                try:
                    self._retire()
                    if self.rows:
                        self._step()
                        self._retire()
                except Exception as error:
                    for row in self.rows:
                        row.job.emit(Event("error", message=f"generation failed: {error}"))
                    self.rows, self.batch = [], BatchCache(self.model, self.cache_dtype)

    def _join(self, job: Job) -> None:
        """Prefill the job alone, emit its first token, and add it to the batch."""
        if job.cancelled:
            return
        if job.deadline is not None and time.monotonic() > job.deadline:  # it waited in the queue too long
            job.emit(Event("done", finish_reason="timeout", prompt_tokens=len(job.prompt)))
            return
        cache = self.model.new_cache(1, len(job.prompt), self.cache_dtype)
        keep = 0 if job.echo_logprobs else 1
        logits = self.model(torch.tensor([job.prompt]), cache=cache, logits_to_keep=keep)[0].float()  # (T, V)
        if job.echo_logprobs:
            job.emit(Event("prompt", tokens=self._prompt_logprobs(job, logits)))
        row = _Row(job, TextStream(self.tokenizer, job.stop), make_generator(job.params.seed),
                   len(job.prompt), logits[-1])
        if job.params.repetition_penalty != 1.0:
            row.history = list(job.prompt)
        if job.params.penalizes_counts:
            row.counts = torch.zeros(1, logits.shape[-1])
        if job.max_tokens == 0:  # echo-only scoring: nothing to generate
            self._finish(row, "length")
            return
        self.batch.add(cache)
        self.rows.append(row)
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        self._choose(row)

    def _step(self) -> None:
        """One decode step for every row: feed each row's last token, get each row's next logits."""
        cache = self.batch.before_step()
        tokens = torch.tensor([[r.last] for r in self.rows])  # (B, 1)
        positions = torch.tensor([[r.position] for r in self.rows])  # (B, 1): each row counts its own tokens
        logits = self.model(tokens, cache=cache, positions=positions)[:, -1].float()  # (B, V)
        self.steps += 1
        for row, row_logits in zip(self.rows, logits):
            row.logits, row.position = row_logits, row.position + 1
            self._choose(row)

    def _choose(self, row: _Row) -> None:
        """Sample the row's next token from its logits and stream it (the token is fed next step)."""
        params = row.job.params
        history = torch.tensor([row.history]) if row.history else None  # (1, L)
        token = int(sample(row.logits[None], params, row.generator, history, row.counts)[0])
        row.counts = count_tokens(row.counts, torch.tensor([token]))
        if row.history:
            row.history.append(token)
        if token in self.stop_ids or token in params.stop_token_ids:
            row.finish_reason = "stop"
            return
        row.generated, row.last = row.generated + 1, token
        row.pending.append(self._token_info(row.job, row.logits, token))
        text = row.stream.push(token)
        if text or row.stream.stopped:
            row.job.emit(Event("text", text=text, tokens=row.pending))
            row.pending = []
        if row.stream.stopped:
            row.finish_reason = "stop"
        elif row.generated >= row.job.max_tokens or row.position + 1 >= self.context:
            row.finish_reason = "length"

    def _retire(self) -> None:
        """Finish rows that are done, cancelled or past their deadline; drop them from the batch."""
        now, keep = time.monotonic(), []
        for i, row in enumerate(self.rows):
            reason = row.finish_reason
            if row.job.cancelled:
                reason = "cancelled"
            elif row.job.deadline is not None and now > row.job.deadline and reason is None:
                reason = "timeout"
            if reason is None:
                keep.append(i)
            else:
                self._finish(row, reason)
        if len(keep) != len(self.rows):
            self.batch.remove(keep)
            self.rows = [self.rows[i] for i in keep]

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.stream.finish()
        if rest or row.pending:
            row.job.emit(Event("text", text=rest, tokens=row.pending))
        row.job.emit(Event("done", finish_reason=reason, prompt_tokens=len(row.job.prompt),
                           completion_tokens=row.generated))

    # -- log-probabilities ------------------------------------------------------------------------

    def _token_info(self, job: Job, logits: torch.Tensor, token: int) -> TokenInfo:
        if job.top_logprobs is None:  # only the id is needed
            return TokenInfo(token, "", 0.0, None)
        return self._scored(torch.log_softmax(logits, -1), token, job.top_logprobs)

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor) -> list[TokenInfo]:
        """The prompt's tokens with the log-probability the model gave each (NaN for the first)."""
        logprobs = torch.log_softmax(logits, -1)  # (T, V): row t predicts token t + 1
        first = TokenInfo(job.prompt[0], self._text(job.prompt[0]), float("nan"), None)
        return [first] + [self._scored(logprobs[t], token, job.top_logprobs or 0)
                          for t, token in enumerate(job.prompt[1:])]

    def _scored(self, logprobs: torch.Tensor, token: int, top_k: int) -> TokenInfo:
        """token's log-prob in `logprobs` (V,), with the top_k most likely tokens when top_k > 0."""
        top = None
        if top_k > 0:
            values, ids = logprobs.topk(top_k)
            top = {self._text(int(i)): float(v) for v, i in zip(values, ids)}
        return TokenInfo(token, self._text(token), float(logprobs[token]), top)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special=False)

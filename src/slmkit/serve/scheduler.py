"""Continuous batching: one thread owns a model and decodes every active request in shared steps.

Requests wait in a bounded queue; between decode steps, waiting requests are prefilled together
(in passes of similar lengths; a request that echoes prompt log-probabilities is prefilled alone,
as it needs every position's logits) and join the batch, and finished, cancelled or timed-out ones
leave it. Every request gets its own sampling settings and random generator, so a seeded request
samples the same tokens whatever else shares its steps (greedy ones are also bit-for-bit what
`Engine` produces, up to the reduction order of batched matmuls).

Callers receive `Event`s through the `emit` callback they pass in, called from the scheduler
thread (the server forwards them into its event loop).

Three things save work under load (both engines):
- prefix caching (`slmkit.serve.prefix`): every prefilled prompt's KV state is kept, within a byte
  budget, and a prompt that starts like a kept one (a shared system prompt, earlier chat turns) runs
  only its new tokens;
- chunked prefill on a chunked runner (llama.cpp): prompts are fed in pieces of at most
  PREFILL_CHUNK tokens inside the same llama_decode as the running rows' decode step, so a long
  prompt never stalls the streams (the torch runner prefills whole prompts between steps);
- speculative decoding when one request decodes alone: prompt-lookup guesses (as `slm generate
  --speculate lookup`) are verified in one pass, each position sampled exactly as a plain step would.

The forward passes belong to a runner (`slmkit.serve.runners`): slmkit's torch engine, or
llama.cpp with one sequence per row; everything else here is the same for both.
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
from slmkit.infer.constrain import TokenMatcher
from slmkit.infer.sampling import SamplingParams, TokenChooser
from slmkit.infer.speculate import PromptLookup
from slmkit.serve.config import LOOKUP_TOKENS, PREFIX_CACHE_MB
from slmkit.serve.prefix import Hit, PrefixCache
from slmkit.serve.runners import LlamaCppRunner, TorchRunner
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
    matcher: TokenMatcher | None = None  # keeps the text inside a grammar (structured output)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this job at the next step (a client went away)."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass
class _Row:
    job: Job
    stream: TextStream
    chooser: TokenChooser  # its sampling state: seed, penalties' history and counts, grammar
    position: int  # RoPE position of the token fed at the next step (= tokens so far)
    logits: torch.Tensor  # (V,) logits for the next token
    last: int = -1  # the token fed at the next step
    seen: list[int] = field(default_factory=list)  # prompt and chosen tokens (what prompt lookup searches)
    generated: int = 0
    finish_reason: str | None = None
    pending: list[TokenInfo] = field(default_factory=list)  # tokens whose text the stream holds back


@dataclass
class _Filling:
    """A prompt being fed to a chunked runner in pieces."""

    job: Job
    handle: object  # the runner's sequence
    done: int  # prompt tokens already in its cache (a reused prefix, then the pieces run so far)

    @property
    def left(self) -> int:
        return len(self.job.prompt) - self.done


PREFILL_TOKENS = 1024  # padded tokens per joint prefill pass (torch runner)
# Prompt tokens per pass while rows decode (chunked runner): a 256-token piece costs about three decode
# steps of 32 rows on 2 cores, so the streams slow down while a long prompt is read but never stop.
PREFILL_CHUNK = 256


def prefill_groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that join together, shortest prompts first, in groups of at most PREFILL_TOKENS padded
    tokens: similar lengths waste little on padding, and the first groups get their first token
    while later ones are still being prefilled."""
    groups: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: len(j.prompt)):
        if groups and len(job.prompt) * (len(groups[-1]) + 1) <= PREFILL_TOKENS:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


class Scheduler:
    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, stop_ids: list[int] = (), prefix_cache_mb: float = PREFIX_CACHE_MB,
                 lookup_tokens: int = LOOKUP_TOKENS):
        """model: a torch model, or a runner (`slmkit.serve.runners`) for another engine;
        prefix_cache_mb: memory for cached prompt prefixes (0: off); lookup_tokens: prompt-lookup
        guesses verified per pass when one request decodes alone (0: off)."""
        self.runner = model if isinstance(model, (TorchRunner, LlamaCppRunner)) else TorchRunner(model)
        self.config = self.runner.config
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or self.runner.max_seq_len, self.runner.max_seq_len)
        self.stop_ids = set(stop_ids)
        self.rows: list[_Row] = []
        self.filling: list[_Filling] = []  # prompts a chunked runner is reading
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.lookup, self.lookup_tokens = PromptLookup(), lookup_tokens
        self.drafted = self.accepted = 0  # speculative guesses verified and kept (metrics, tests)
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.steps = 0  # decode steps run (for metrics and tests)
        self.prefills = 0  # prefill passes run (several joining requests share one)
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
        return len(self.rows) + len(self.filling)

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
                while not self._stopping and not self.waiting and not self.rows and not self.filling:
                    self.lock.wait()
                if self._stopping:
                    break
                joining = []
                while self.waiting and self.active + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            with torch.inference_mode():
                self._join_all([job for job in joining if self._wanted(job)])
                try:
                    self._retire()
                    if self.rows or self.filling:
                        self._advance()
                        self._retire()
                except Exception as error:
                    self._fail_all(error)

    def _join_all(self, jobs: list[Job]) -> None:
        """Start the joining jobs. A job echoing prompt log-probabilities is prefilled whole and alone (it
        needs every position's logits). On a chunked runner the others only get their sequence here
        (`_advance` reads them in pieces); otherwise a prompt that starts with a cached prefix is
        prefilled alone from it, and the rest together, in groups of similar lengths."""
        rest = [job for job in jobs if not job.echo_logprobs]
        for job in jobs:
            if job.echo_logprobs:
                self._guard([job], lambda job=job: self._join([job]))
        if self.runner.chunked:
            for job in rest:
                self._guard([job], lambda job=job: self._open(job))
            return
        fresh = []
        for job in rest:
            hit = self.prefix.lookup(job.prompt) if self.prefix else None
            if hit is None:
                fresh.append(job)
            else:
                self._guard([job], lambda job=job, hit=hit: self._join_reusing(job, hit))
        for group in prefill_groups(fresh):
            self._guard(group, lambda group=group: self._join(group))

    @staticmethod
    def _guard(jobs: list[Job], work: Callable[[], None]) -> None:
        """Run `work` for these jobs; if it fails, they end with an error and the others go on."""
        try:
            work()
        except Exception as error:
            for job in jobs:
                job.emit(Event("error", message=f"generation failed: {error}"))

    def _fail_all(self, error: Exception) -> None:
        """A shared pass failed: every running request ends with the error, and the runner starts over."""
        for job in [row.job for row in self.rows] + [f.job for f in self.filling]:
            job.emit(Event("error", message=f"generation failed: {error}"))
        for filling in self.filling:
            self.runner.release(filling.handle)
        self.rows, self.filling = [], []
        self.runner.reset()

    @staticmethod
    def _wanted(job: Job) -> bool:
        """False for a job not yet decoding (waiting, or its prompt being read) that was cancelled or
        is past its deadline (a timed-out one is answered here)."""
        if job.cancelled:
            return False
        if job.expired(time.monotonic()):
            job.emit(Event("done", finish_reason="timeout", prompt_tokens=len(job.prompt)))
            return False
        return True

    def _join(self, jobs: list[Job]) -> None:
        """Prefill the jobs in one pass, emit each one's first token, add them to the batch."""
        echo = jobs[0].echo_logprobs  # an echoing job is always prefilled alone: it needs every position's logits
        handles, logits = self.runner.prefill([job.prompt for job in jobs], echo)
        self.prefills += 1
        for job, handle, job_logits in zip(jobs, handles, logits):
            if echo:
                job.emit(Event("prompt", tokens=self._prompt_logprobs(job, job_logits)))
            self._start(job, job_logits[-1], handle)
        if not echo:  # after every first token is out: copying the state would delay them
            for job, handle in zip(jobs, handles):
                self._remember(job, handle)

    def _join_reusing(self, job: Job, hit: Hit) -> None:
        """Prefill a job from a cached prefix (torch runner): only the prompt's new tokens run."""
        handle, logits = self.runner.prefill_reusing(job.prompt, hit)
        self.prefills += 1
        self._start(job, logits[-1], handle)
        self._remember(job, handle)

    def _open(self, job: Job) -> None:
        """Give a job a sequence of the chunked runner, holding its cached prefix if it has one."""
        hit = self.prefix.lookup(job.prompt) if self.prefix else None
        self.filling.append(_Filling(job, self.runner.open(hit), hit.tokens if hit else 0))

    def _remember(self, job: Job, handle) -> None:
        """Keep the started job's prompt KV state in the prefix cache (unless an entry holds it already;
        a job with nothing to generate has already given its sequence back)."""
        if self.prefix is not None and job.max_tokens > 0 and not self.prefix.covers(job.prompt):
            state, nbytes = self.runner.snapshot(handle)
            self.prefix.store(job.prompt, state, nbytes)

    def _start(self, job: Job, logits: torch.Tensor, handle) -> None:
        """A prefilled job (its next-token logits (V,), the runner's handle) becomes a decoding row."""
        matchers = None if job.matcher is None else [job.matcher]
        chooser = TokenChooser(job.params, [job.prompt], logits.shape[-1], matchers,
                               self.stop_ids | set(job.params.stop_token_ids))
        state = _Row(job, TextStream(self.tokenizer, job.stop), chooser, len(job.prompt), logits, seen=list(job.prompt))
        if job.max_tokens == 0:  # echo-only scoring: nothing to generate
            self.runner.release(handle)
            self._finish(state, "length")
            return
        self.runner.admit(handle)
        self.rows.append(state)
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        self._choose(state)

    def _advance(self) -> None:
        """One pass: a decode step for every row (with a chunked runner, in the same pass as the next
        pieces of the prompts it is reading), or a speculative pass for a request decoding alone."""
        if self.runner.chunked and self.filling:
            self._step_and_read()
        elif len(self.rows) == 1 and self.lookup_tokens and not self.waiting:
            self._speculate(self.rows[0])
        else:
            self._step()

    def _step(self) -> None:
        """One decode step for every row: feed each row's last token, get each row's next logits."""
        # each row counts its own positions (RoPE / llama.cpp positions)
        self._decoded(self.runner.step([r.last for r in self.rows], [r.position for r in self.rows]))  # (B, V)

    def _decoded(self, logits: torch.Tensor) -> None:
        """Every row's next logits (B, V) from a decode step: sample and stream each row's token."""
        self.steps += 1
        for row, row_logits in zip(self.rows, logits):
            row.logits, row.position = row_logits, row.position + 1
            self._choose(row)

    def _step_and_read(self) -> None:
        """A chunked runner's pass: the rows' decode step and up to PREFILL_CHUNK prompt tokens (the
        whole batch while no row decodes), shortest prompts first, so the most requests start soonest."""
        budget = PREFILL_CHUNK if self.rows else self.runner.batch_tokens
        pieces = []
        for filling in sorted(self.filling, key=lambda f: f.left):
            if budget <= 0:
                break
            take = min(filling.left, budget)
            pieces.append((filling, filling.done + take))
            budget -= take
        rows = self.rows
        logits, ends = self.runner.run([(r.last, r.position) for r in rows],
                                       [(f.handle, f.job.prompt[f.done:end], f.done, end == len(f.job.prompt))
                                        for f, end in pieces])
        self.prefills += 1
        if rows:
            self._decoded(logits)
        finished = [f for f, end in pieces if end == len(f.job.prompt)]
        for filling, end in pieces:
            filling.done = end
        for filling, last in zip(finished, ends):
            self.filling.remove(filling)
            self._start(filling.job, last, filling.handle)
        for filling in finished:  # after every first token is out: copying the state would delay them
            self._remember(filling.job, filling.handle)

    def _speculate(self, row: _Row) -> None:
        """Verify prompt-lookup guesses for a row decoding alone in one pass; each position is sampled
        exactly as a plain step would sample it, and the first token that differs from the guess ends
        the round (it is the step's own token), so the text is what plain decoding gives."""
        room = min(row.job.max_tokens - row.generated, self.context - row.position) - 1
        draft = self.lookup.propose(row.seen, min(self.lookup_tokens, room))
        if not draft:
            self._step()
            return
        start = row.position
        logits = self.runner.verify([row.last, *draft], start)  # (1 + k, V): row i predicts position start+i+1
        self.steps += 1
        self.drafted += len(draft)
        for i, guess in enumerate([*draft, None]):
            row.logits, row.position = logits[i], row.position + 1
            self._choose(row)
            if row.finish_reason or row.last != guess:
                break
            self.accepted += 1
        self.runner.discard(row.position, start + len(draft) + 1 - row.position)  # the slots of rejected guesses

    def _choose(self, row: _Row) -> None:
        """Sample the row's next token from its logits and stream it (the token is fed next step)."""
        token = row.chooser.choose(row.logits[None])[0]  # a grammar has advanced over it
        if token in row.chooser.stops:
            row.finish_reason = "stop"
            return
        row.generated, row.last = row.generated + 1, token
        row.seen.append(token)
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
        """Finish rows that are done, cancelled or past their deadline; drop them from the batch (and
        prompts being read that were cancelled or timed out)."""
        for filling in [f for f in self.filling if not self._wanted(f.job)]:
            self.filling.remove(filling)
            self.runner.release(filling.handle)
        now, keep = time.monotonic(), []
        for i, row in enumerate(self.rows):
            reason = row.finish_reason
            if row.job.cancelled:
                reason = "cancelled"
            elif row.job.expired(now) and reason is None:
                reason = "timeout"
            if reason is None:
                keep.append(i)
            else:
                self._finish(row, reason)
        if len(keep) != len(self.rows):
            self.runner.keep(keep)
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

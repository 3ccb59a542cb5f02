"""Engine's `generate` for the runtimes that hold one sequence at a time (the phone runtimes: ONNX
Runtime GenAI, ExecuTorch, LiteRT), with slmkit's sampler choosing every token (`decode_rows`, the
decode loop of every engine), so sampling settings, stop tokens and structured output behave as on
the torch and llama.cpp engines. A runtime says how to read a prompt and how to feed one token.
"""

from __future__ import annotations

import time

import torch

from slmkit.infer.constrain import TokenMatcher
from slmkit.infer.engine import Generation, TokenCallback, check_prompt, decode_rows
from slmkit.infer.sampling import SamplingParams


class OneSequenceEngine:
    """Each prompt alone (batch 1: what phones and edge boxes run). Subclasses set `max_seq_len` and
    `vocab_size` and implement `begin` and `feed`."""

    max_seq_len: int
    vocab_size: int

    def begin(self, prompt: list[int], budget: int) -> torch.Tensor:
        """Read `prompt` from the start (up to `budget` tokens follow it); its next-token logits (1, V)."""
        raise NotImplementedError

    def feed(self, token: int, position: int) -> torch.Tensor:
        """Append `token` at slot `position`; the next-token logits (1, V)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Nothing to forget: every prompt starts again from slot 0."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token: TokenCallback | None = None,
                 matchers: list[TokenMatcher] | None = None) -> list[Generation]:
        for prompt in prompts:
            check_prompt(prompt, self.max_seq_len, self.vocab_size)
        params.check_vocab(self.vocab_size)
        out = []
        for row, prompt in enumerate(prompts):
            shifted = None if on_token is None else (lambda _r, tok, row=row: on_token(row, tok))
            out += self._generate(prompt, params, shifted, matchers and [matchers[row]])
        return out

    def _generate(self, prompt: list[int], params: SamplingParams, on_token, matchers) -> list[Generation]:
        start = time.perf_counter()
        budget = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        logits = self.begin(prompt, budget)
        prefill_s = time.perf_counter() - start

        def step(feed: list[tuple[int, int, int]]) -> torch.Tensor:  # one row: (row, token, position)
            _, token, position = feed[0]
            return self.feed(token, position)

        results = decode_rows([prompt], logits, params, budget, on_token, step, matchers)
        for g in results:
            g.prefill_seconds, g.decode_seconds = prefill_s, time.perf_counter() - start - prefill_s
        return results

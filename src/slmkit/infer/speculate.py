"""Draft proposers for speculative decoding (the target model verifies them in `Engine`).

A proposer guesses the next few tokens cheaply; the target model then runs the last chosen token
and the k guesses in ONE forward pass (k+1 positions, about the cost of one step on a CPU where
reading the weights dominates) and keeps the guesses it would have chosen itself.

Both proposers here draft deterministically, so verification needs no separate rejection step:
the target samples each position exactly as plain decoding would (same processing, same random
draws in the same order) and a guess is kept iff the target's token equals it. With q the
one-hot draft distribution, accepting d with probability min(1, p(d)/q(d)) = p(d) and otherwise
sampling from norm(max(0, p - q)) is the same as drawing x ~ p and keeping d iff x = d, which is
the rule of the speculative-sampling papers (Leviathan et al. 2023; Chen et al. 2023). So the
output is the target's distribution, and with a seed it is the very text plain decoding gives, up
to rounding: a (k+1)-position pass sums in another order than k+1 one-position passes, which is
invisible in fp32 here but can flip a near-tie in bf16.
"""

from __future__ import annotations

from typing import Protocol

from slmkit.infer.sampling import SamplingParams


class Drafter(Protocol):
    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to k guessed tokens that follow `context` (prompt and everything generated so far)."""


class PromptLookup:
    """Prompt-lookup decoding (Saxena 2023): find the latest earlier occurrence of the context's last
    n tokens (n from `max_ngram` down to `min_ngram`) and propose what followed it. Free to run, and
    effective where the answer copies from the prompt: summaries, extraction, code edits, RAG."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        """min_ngram 2: a single shared token predicts the continuation too rarely to pay for verifying
        it (SmolLM2 summarizing 4 SciTLDR abstracts, 8 guesses per pass: 9% of guesses kept when
        1-grams may match, 18% with 2-grams and up)."""
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest match first, never the tail itself
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []


class DraftModel:
    """A smaller model with the same tokenizer (e.g. a student from `slm distill`) drafts greedily.

    It keeps its own KV cache between calls (its engine reuses the longest common prefix), so each
    round only runs the tokens the target accepted since, plus the k new guesses."""

    def __init__(self, engine):
        self.engine = engine  # an Engine over the draft model

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or len(context) + k > self.engine.max_seq_len:
            return []
        return self.engine.generate([context], SamplingParams(max_new_tokens=k))[0].tokens

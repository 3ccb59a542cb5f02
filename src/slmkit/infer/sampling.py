"""Choosing the next token: a pure function of (logits, params, generator, history).

Repetition penalty -> frequency/presence penalties -> logit bias -> the structured-output mask,
then greedy when temperature is 0;
otherwise temperature -> top-k -> top-p -> a draw from `generator`, so a seed reproduces a sample
exactly. The repetition penalty follows transformers' logits processor (it divides positive logits
and multiplies negative ones, over every token already in the sequence, prompt included); the
frequency and presence penalties and the logit bias follow OpenAI's definitions
(logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting only the tokens generated
so far; logit[j] += bias[j]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slmkit.errors import SlmError


@dataclass
class SamplingParams:
    """How the next token is chosen, and when a text stops: the one sampling type -- `slm generate`
    and `slm chat` flags (OpenAI's names), the decode core, the server's requests."""

    max_new_tokens: int = field(default=256, metadata={"flag": "--max-tokens", "metavar": "N"})
    """new tokens at most"""
    temperature: float = 0.0
    """0 = greedy; e.g. 0.7 for variety"""
    top_k: int = 0
    """sample from the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling mass (1 = off)"""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the sequence, prompt included (1 = off; transformers' definition)"""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per earlier occurrence in the generated text (-2..2)"""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once if it was generated at all (-2..2)"""
    logit_bias: dict[int, float] = field(default_factory=dict, metadata={"metavar": "{ID: BIAS}"})
    """added to a token's logit, by token id (-100..100; -100 bans it), e.g. '{13: -100}'"""
    seed: int | None = None
    """seed for sampling (reproducible output)"""
    stop: list[str] = field(default_factory=list, metadata={"split": False})
    """stop strings: the text ends before the first one (the model's end-of-sequence tokens stop it too)"""
    stop_token_ids: list[int] = field(default_factory=list)
    """more token ids that end the text (beside the model's own end-of-sequence tokens)"""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SlmError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SlmError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise SlmError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SlmError(f"{name} must be in [-2, 2] (as in OpenAI's API), got {getattr(self, name)}")
        bad = [t for t, b in self.logit_bias.items() if not -100 <= b <= 100 or int(t) < 0]
        if bad:
            raise SlmError(f"logit_bias for token {bad[0]} must have a token id >= 0 and a bias in [-100, 100]")

    @property
    def penalizes_counts(self) -> bool:
        """Whether sampling needs the per-token counts of the generated text."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a logit_bias token the model does not have (one line, before any work)."""
        outside = [t for t in self.logit_bias if int(t) >= vocab_size]
        if outside:
            raise SlmError(f"logit_bias names token {outside[0]}, but the model's vocabulary is 0..{vocab_size - 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); history (B, L) token ids already in each sequence."""
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def apply_count_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                          presence: float) -> torch.Tensor:
    """logits (B, V); counts (B, V) how often each token was generated so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """logits (B, V) with bias[j] added to column j of every row."""
    ids = torch.tensor([int(t) for t in bias], device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def count_tokens(counts: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """counts (B, V) after adding one occurrence of each row's token (B,); None stays None."""
    if counts is None:
        return None
    return counts.index_put_((torch.arange(len(tokens), device=tokens.device), tokens),
                             torch.ones(len(tokens), dtype=counts.dtype, device=counts.device), accumulate=True)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history: torch.Tensor | None = None, counts: torch.Tensor | None = None,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    history (B, L): every token id so far, prompt included (repetition penalty); counts (B, V): how
    often each token was generated (frequency/presence penalties; see `count_tokens`); allowed
    (B, V) bool: the only tokens that may be chosen (structured output, `slmkit.infer.constrain`)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.penalizes_counts and counts is not None:
        logits = apply_count_penalties(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.greedy:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenChooser:
    """The sampling state of rows decoded together, and the one place a next token is chosen.

    It holds one generator (a seed reproduces the draws), each row's history (repetition penalty:
    prompt + chosen tokens), its generated-token counts (frequency/presence penalties) and its
    grammar matcher (structured output). Every decode loop — `Engine` (plain and speculative), the
    llama.cpp engine and each row of the server's scheduler — chooses through it, so a request's
    tokens do not depend on which loop runs it."""

    def __init__(self, params: SamplingParams, prompts: list[list[int]], vocab_size: int,
                 matchers: list | None = None, stops: set[int] | None = None):
        """matchers: one per row (`slmkit.infer.constrain.TokenMatcher`), or None; stops: token ids
        that end a row (a grammar never advances over them)."""
        self.params, self.matchers = params, matchers
        self.stops = set(params.stop_token_ids) if stops is None else stops
        self.generator = make_generator(params.seed)
        self.history = _padded_history(prompts) if params.repetition_penalty != 1.0 else None  # (B, L)
        self.counts = torch.zeros(len(prompts), vocab_size) if params.penalizes_counts else None  # (B, V)

    def choose(self, logits: torch.Tensor, rows: list[int] | None = None) -> list[int]:
        """The next token of each row in `rows` (default: every row, in order) from their logits
        (len(rows), V); those rows' state then records it."""
        rows = list(range(len(logits))) if rows is None else rows
        index = torch.tensor(rows)
        allowed = torch.stack([self.matchers[r].allowed() for r in rows]) if self.matchers else None
        history = self.history[index].to(logits.device) if self.history is not None else None
        counts = self.counts[index] if self.counts is not None else None
        tokens = sample(logits, self.params, self.generator, history, counts, allowed).cpu()
        if self.counts is not None:
            self.counts[index] = count_tokens(counts, tokens)
        if self.history is not None:  # rows not chosen for repeat their last id (a no-op for the penalty)
            column = self.history[:, -1:].clone()
            column[index, 0] = tokens
            self.history = torch.cat([self.history, column], dim=1)
        chosen = tokens.tolist()
        if self.matchers:
            for row, tok in zip(rows, chosen):
                if tok not in self.stops:
                    self.matchers[row].advance(tok)
        return chosen


def _padded_history(prompts: list[list[int]]) -> torch.Tensor:
    """(B, L) ids seen so far; short rows are padded with their own first token (a no-op for
    the repetition penalty, which only asks whether a token occurred)."""
    longest = max(len(p) for p in prompts)
    return torch.tensor([[p[0]] * (longest - len(p)) + list(p) for p in prompts])

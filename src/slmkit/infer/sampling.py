"""Choosing the next token: a pure function of (logits, params, generator, history).

Greedy when temperature is 0; otherwise repetition penalty -> temperature -> top-k -> top-p ->
a draw from `generator`, so a seed reproduces a sample exactly. The order and the definitions
follow transformers' logits processors (repetition penalty divides positive logits and multiplies
negative ones, over every token already in the sequence, prompt included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slmkit.errors import SlmError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the sequence
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

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
           history: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

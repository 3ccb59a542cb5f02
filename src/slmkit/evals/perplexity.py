"""Perplexity and bits per byte of a text file, with a sliding window.

Every token after the first is scored exactly once: the first window scores all its tokens, and
each later window moves by `stride` tokens and scores only those, with up to `context - stride`
earlier tokens in view. Bits per byte (total negative log-likelihood in bits over the text's
UTF-8 bytes) compares models with different tokenizers; perplexity is per token of this model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slmkit.errors import SlmError


@dataclass
class PerplexityResult:
    file: str
    tokens: int  # scored tokens
    bytes: int
    nll_nats: float
    context: int
    stride: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes

    def summary(self) -> str:
        return (f"{self.file}: perplexity {self.perplexity:.3f}, {self.bits_per_byte:.4f} bits/byte over "
                f"{self.tokens:,} tokens ({self.bytes:,} bytes; window {self.context}, stride {self.stride})")


@torch.inference_mode()
def text_perplexity(model, tokenizer, path: str | Path, context: int | None = None, stride: int | None = None,
                    progress: bool = True) -> PerplexityResult:
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"no text file at {path}")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special=False)
    if len(ids) < 2:
        raise SlmError(f"{path} has fewer than 2 tokens: nothing to score")
    context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise SlmError(f"--stride must be between 1 and the window of {context} tokens")
    nll, scored = 0.0, 0
    starts = range(0, len(ids) - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        # tokens ids[begin+1 : begin+stride+1] (or the whole first window) are scored this time
        end = min(begin + stride, len(ids) - 1) if begin else min(context, len(ids) - 1)
        if begin and end <= scored:
            continue
        first = max(0, end - context)
        window = torch.tensor(ids[first : end + 1])
        logprobs = torch.log_softmax(model(window[None, :-1]).float()[0], dim=-1)  # (T, V)
        new = end - scored  # the targets ids[scored+1 .. end]
        targets = window[-new:]
        nll -= logprobs[-new:].gather(-1, targets[:, None]).sum().item()
        scored = end
    return PerplexityResult(str(path), scored, len(text.encode()), nll, context, stride)

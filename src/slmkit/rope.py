"""Rotary position embeddings: the frequency tables of every RoPE variant the families use, and
their application in the rotate-half layout HF stores q/k rows in.

Variants: plain, `linear` (position interpolation), `llama3` (Llama 3.1+), `yarn` (Qwen's long
context) and `longrope` (Phi-3.5, Phi-4-mini, with its short/long switch); partial rotary (Phi-2,
Phi-4-mini) rotates the first R dims of each head. Any other `rope_type` is refused by name, never
approximated. Each formula is transformers' (modeling_rope_utils.py), which the model tests match.

This module knows no model, config or file: `slmkit.model` builds a `Rotary` per table it needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slmkit.config import ROPE_TYPES, rope_type
from slmkit.errors import SlmError


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None,
                  max_positions: int | None = None) -> torch.Tensor:
    """Inverse frequencies (R/2,) for R = dim rotary dims, with optional `linear`, Llama-3 or YaRN
    scaling (YaRN's and LongRoPE's magnitude factors and LongRoPE's second set: see `Rotary`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, dim, theta, scaling, max_positions)
    raise SlmError(f"rope_scaling type '{kind}' is not supported (supported: {', '.join(ROPE_TYPES)})")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1+: long wavelengths are slowed by `factor`, short ones kept, the middle blended."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def yarn_factor(s: dict, max_positions: int | None) -> float:
    return s.get("factor") or max_positions / s["original_max_position_embeddings"]


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: dict, max_positions: int | None) -> torch.Tensor:
    """YaRN (Qwen's long-context recipe): dims that turn fewer than beta_slow times over the original
    context are interpolated by `factor`, those turning more than beta_fast times kept, a ramp between."""
    factor, original = yarn_factor(s, max_positions), s["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def yarn_magnitude(s: dict, max_positions: int | None) -> float:
    """YaRN's cos/sin scale: 0.1 ln(factor) + 1 (or the ratio of two such with mscale/mscale_all_dim)."""
    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = yarn_factor(s, max_positions)
    if s.get("attention_factor"):
        return float(s["attention_factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, magnitude: float = 1.0):
    """cos and signed sin, (B, 1, T, R), for integer positions (B, T); computed in fp32.

    The sin's first half is negated so that rotate_half(x) * sin == roll(x, R/2) * signed_sin,
    which `apply_rope` uses: one roll instead of two slices, a negation and a concatenation.
    magnitude: LongRoPE scales both by its attention factor.
    """
    freqs = positions.unsqueeze(-1).float() * inv_freq  # (B, T, R/2)
    sin, cos = freqs.sin(), freqs.cos()
    if magnitude != 1.0:
        sin, cos = sin * magnitude, cos * magnitude
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # (B, 1, T, R)
    signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
    return cos.to(dtype), signed_sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE on the first R dims of x (all of them unless partial rotary: Phi-2 and
    Phi-4-mini rotate part of each head and pass the rest through): x * cos + rotate_half(x) * sin."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, signed_sin), x[..., r:]), dim=-1)
    return x * cos + x.roll(r // 2, dims=-1) * signed_sin


class Rotary(nn.Module):
    """One RoPE table: inverse frequencies for R dims and a base, and the magnitude YaRN and LongRoPE
    give cos/sin. LongRoPE (Phi-3.5, Phi-4-mini) keeps a short and a long set and switches to the
    long one once a forward pass reaches past the original context -- exactly as transformers does."""

    def __init__(self, dim: int, theta: float, scaling: dict | None, max_positions: int):
        super().__init__()
        self.long_from, self.magnitude = None, 1.0
        if rope_type(scaling) != "longrope":
            self.register_buffer("inv_freq", rope_inv_freq(dim, theta, scaling, max_positions), persistent=False)
            if rope_type(scaling) == "yarn":
                self.magnitude = yarn_magnitude(scaling, max_positions)
            return
        base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        self.register_buffer("inv_freq", 1.0 / (torch.tensor(scaling["short_factor"]) * base), persistent=False)
        self.register_buffer("long_inv_freq", 1.0 / (torch.tensor(scaling["long_factor"]) * base), persistent=False)
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or max_positions / original
        self.long_from = original
        self.magnitude = scaling.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if self.long_from is not None and int(positions.max()) + 1 > self.long_from:
            inv_freq = self.long_inv_freq
        return rope_cos_sin(inv_freq, positions, dtype, self.magnitude)

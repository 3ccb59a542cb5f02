"""How big a model is: parameters, weight memory at a precision, KV-cache memory for a context.

Parameters are counted on the real `CausalLM` built on the `meta` device (no memory used), so
the count is exactly what the model code allocates. Weight memory at b bits adds the per-group
scale that every practical quantizer stores (fp16 scale per `group_size` weights: Q8_0 and Q4_0
are 8.5 and 4.5 bits per weight), which is why 7B parameters at 4 bits need ~4 GB, not 3.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmkit.config import ModelConfig
from slmkit.model import CausalLM


@dataclass
class ParamCount:
    total: int
    embedding: int  # input embedding (+ output head when untied)
    active: int  # used per token: total minus the experts a token does not visit

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_params(config: ModelConfig) -> ParamCount:
    with torch.device("meta"):
        model = CausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()
    active = total
    if config.num_local_experts:
        idle = config.num_local_experts - config.num_experts_per_tok
        for block in model.model.layers:
            expert = block.block_sparse_moe.experts[0]
            active -= idle * sum(p.numel() for p in expert.parameters())
    return ParamCount(total, embedding, active)


def bits_per_weight(bits: int, group_size: int = 32) -> float:
    """Storage bits per weight including a 16-bit scale per group (none at 16 bits and above)."""
    if bits >= 16 or group_size <= 0:
        return float(bits)
    return bits + 16 / group_size


def weight_bytes(params: int, bits: int, group_size: int = 32) -> int:
    return int(params * bits_per_weight(bits, group_size) / 8)


def kv_cache_bytes(config: ModelConfig, context: int, batch: int = 1, bits: int = 16) -> int:
    """Keys and values for every applied layer: 2 x K x D per token per layer (up to the window in
    sliding-window layers)."""
    def held(layer: int) -> int:  # a sliding layer's rolling cache needs no more than the window
        return min(context, config.sliding_window) if config.is_sliding(layer) else context

    values = sum(2 * config.kv_heads(i // config.block_repeats) * config.resolved_head_dim * held(i)
                 for i in range(config.num_hidden_layers))
    return int(values * batch * bits / 8)


def human_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as model cards and RAM sizes are quoted."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float, digits: int = 2) -> str:
    """134515008 -> "134.52M" (digits=1: "134.5M", the precision model sizes are quoted in)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"

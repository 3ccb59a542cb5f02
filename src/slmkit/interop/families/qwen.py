"""Qwen2 / Qwen2.5 and Qwen3.

Qwen2 has biases on q, k and v only; Qwen3 drops them and normalises each head's q and k before
RoPE. Both may slide a window over the layers from `max_window_layers` on (transformers 5 writes
the resulting `layer_types`). llama.cpp runs them with NEOX RoPE (no q/k permutation) and no
sliding window.
"""

from __future__ import annotations

from slmkit.config import ModelConfig
from slmkit.interop.families.base import Family, GgufSpec


def read_qwen(data: dict, values: dict) -> None:
    n = values["num_hidden_layers"]
    window = data.get("sliding_window") if data.get("use_sliding_window") else None
    if "layer_types" not in data and window:
        start = int(data.get("max_window_layers", n))
        values["layer_types"] = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    types = values.get("layer_types") or []
    if "sliding_attention" in types:
        values["sliding_window"] = window or data.get("sliding_window")
    elif all(t == "full_attention" for t in types):  # transformers 5 writes the list even when nothing slides
        values.pop("layer_types", None)


def write_qwen(c: ModelConfig, data: dict) -> None:
    types = c.layer_types or ["sliding_attention" if c.sliding_window else "full_attention"] * c.num_hidden_layers
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    data.update(use_sliding_window=bool(sliding), sliding_window=c.sliding_window, layer_types=types,
                max_window_layers=sliding[0] if sliding else c.num_hidden_layers)


FAMILIES = [
    Family("qwen2", "Qwen2ForCausalLM", GgufSpec("qwen2", full_width_q=True, no_window=True),
           fixed={"attention_bias": True, "attention_out_bias": False},
           free=frozenset({"sliding_window", "layer_types", "hidden_act"}), read=read_qwen, write=write_qwen),
    Family("qwen3", "Qwen3ForCausalLM", GgufSpec("qwen3", no_window=True), fixed={"qk_norm": "head"},
           free=frozenset({"attention_bias", "sliding_window", "layer_types", "hidden_act"}), read=read_qwen,
           write=write_qwen),
]

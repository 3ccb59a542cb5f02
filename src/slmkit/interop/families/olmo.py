"""OLMo-2.

No norm before attention or the MLP: each branch's output is normalised instead (post-norm, HF's
`post_attention_layernorm` and `post_feedforward_layernorm`), and q and k are normalised over the
whole projection, all heads together, before RoPE. llama.cpp's olmo2 graph matches this (NEOX
RoPE, q/k norms as wide as the projections) and always has an output tensor.
"""

from __future__ import annotations

from slmkit.interop.families.base import Family, GgufSpec

FAMILIES = [
    Family("olmo2", "Olmo2ForCausalLM", GgufSpec("olmo2", output="required", full_width_q=True, no_window=True),
           fixed={"block_layout": "post", "qk_norm": "projection"}, free=frozenset({"attention_bias", "hidden_act"})),
]

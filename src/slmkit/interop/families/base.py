"""The shape of a family's knowledge: `Family` (config.json, checkpoint names, transformers class)
and `GgufSpec` (llama.cpp architecture), and the switches of ModelConfig they fix or carry.

`model.py` runs every family through the same block with switches (`ModelConfig.norm_type`,
`block_layout`, ...). A family fixes some switches (Gemma always has 1 + w norms), carries others
in its config.json (Gemma 2's soft caps) and cannot express the rest; `Family.mismatch` says
which switch a config has that the family cannot hold, which decides the `model_type` an export
is written as (`export_family`): the model's own family when it fits, else a Llama-family class
that does, else `slmkit`.

`hf.py` and `gguf.py` do the generic work (common keys, RoPE settings, names shared by all) and
call the family's hooks for the rest. Nothing here touches weights beyond renaming and splitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from slmkit.config import ModelConfig
from slmkit.rope import rope_type

# The switches of ModelConfig a family can fix or carry, with the value a plain Llama has.
SWITCHES: dict[str, object] = {
    "norm_type": "rms", "block_layout": "pre", "qk_norm": None, "gated_mlp": True, "lm_head_bias": False,
    "attention_bias": False, "attention_out_bias": lambda c: c.attention_bias, "mlp_bias": False,
    "sliding_window": None, "layer_types": None, "rope_local_base_freq": None, "no_rope_layers": None,
    "partial_rotary_factor": 1.0, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
    "attention_multiplier": None, "logits_scaling": 1.0, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "num_local_experts": 0, "hidden_dropout": 0.0, "hidden_act": "silu",
}


def switch_value(c: ModelConfig, name: str):
    """The switch as the model runs it (attention_out_bias None means 'as attention_bias')."""
    if name == "attention_out_bias":
        return c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    if name == "layer_types" and c.layer_types is not None and "sliding_attention" not in c.layer_types:
        return None  # all full: the same as no list
    return getattr(c, name)


def sqrt_hidden(c: ModelConfig) -> float:
    """Gemma's embedding scale."""
    return math.sqrt(c.hidden_size)


@dataclass(frozen=True)
class GgufSpec:
    """How one llama.cpp architecture stores a family (see llama.cpp's src/models/<arch>.cpp)."""

    arch: str
    permute_qk: bool = False  # NORM RoPE (pairs 2i, 2i+1): HF's rotate-half q/k rows are permuted
    norm_offset: bool = False  # Gemma: the file stores 1 + w for every RMSNorm weight
    fused_ffn: bool = False  # Phi-3: ffn_up holds [gate; up] and there is no ffn_gate
    eps_key: str = "attention.layer_norm_rms_epsilon"
    output: str = "optional"  # optional (absent = tied) | never (always tied) | required
    full_width_q: bool = False  # the graph takes q as wide as the hidden size (heads x head_dim = hidden)
    write: Callable | None = None  # (GgufWriter, ModelConfig) -> None: the arch's own metadata
    read: Callable | None = None  # (key reader, tensor names, values dict) -> None: the reverse
    refuse: Callable | None = None  # ModelConfig -> the reason llama.cpp cannot run it, or None
    q_scale: Callable | None = None  # ModelConfig -> factor folded into q (attention scales llama.cpp hard-codes)
    no_window: bool = False  # the graph has no sliding window (the export's context is capped at it)
    act: str = "silu"  # the MLP's activation in the graph (llama.cpp's GELU is the tanh approximation)


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json model_type
    hf_class: str  # config.json architectures[0]
    gguf: GgufSpec | None
    fixed: dict = field(default_factory=dict)  # switches this class always has (value or config -> value)
    free: frozenset = frozenset()  # switches its config.json carries
    rope_types: tuple[str, ...] = ("default", "linear", "llama3", "yarn")
    read: Callable | None = None  # (config.json dict, values dict) -> None: family keys into ModelConfig values
    write: Callable | None = None  # (ModelConfig, config.json dict) -> None: the reverse
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    default_theta: float = 10000.0
    divisible_heads: bool = False  # transformers' class requires hidden_size % heads == 0 even with head_dim
    renames: dict = field(default_factory=dict)  # our module path -> the family's checkpoint name
    fused: dict = field(default_factory=dict)  # the family's fused linear -> our linears, in row order
    refused: dict = field(default_factory=dict)  # config.json key -> the values slmkit runs (others refused)
    check: Callable | None = None  # ModelConfig -> what else this class cannot hold, or None

    def mismatch(self, c: ModelConfig) -> str | None:
        """The first setting of `c` this family's transformers class cannot hold, or None."""
        for name, plain in SWITCHES.items():
            if name in self.free:
                continue
            want = self.fixed.get(name, plain)
            want = want(c) if callable(want) else want
            if switch_value(c, name) != want:
                return f"{name}={switch_value(c, name)!r}"
        if rope_type(c.rope_scaling) not in self.rope_types:
            return f"rope_scaling {rope_type(c.rope_scaling)}"
        if self.divisible_heads and c.hidden_size % c.heads(0):
            return f"hidden_size {c.hidden_size} not a multiple of {c.heads(0)} heads"
        return self.check(c) if self.check else None

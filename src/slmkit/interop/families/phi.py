"""Phi-2 (`phi`) and Phi-3 / 3.5 / Phi-4-mini (`phi3`).

Phi-2: one LayerNorm feeds attention and the MLP in parallel, every linear has a bias (the head
too), the MLP is fc1 -> GELU -> fc2 (our up_proj/down_proj) and RoPE turns part of each head.
Its checkpoint names differ from ours (`dense`, `fc1`, `fc2`, `final_layernorm`): renamed here.

Phi-3: a Llama block whose files fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`
(gate first), split at load and joined at save so adapters, pruning and quantization see the same
linears as for every other family; Phi-3.5 and Phi-4-mini use LongRoPE and Phi-4-mini partial
rotary. llama.cpp keeps Phi-3's ffn_up fused and runs no sliding window.
"""

from __future__ import annotations

import math

import numpy as np

from slmkit.config import ModelConfig
from slmkit.interop.families.base import Family, GgufSpec
from slmkit.rope import rope_type

PHI2_NAMES = {"self_attn.o_proj": "self_attn.dense", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
              "model.norm": "model.final_layernorm", "self_attn.q_norm": "self_attn.q_layernorm",
              "self_attn.k_norm": "self_attn.k_layernorm"}
PHI3_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def read_phi(data: dict, values: dict) -> None:
    values["rms_norm_eps"] = float(data.get("layer_norm_eps", 1e-5))
    values.setdefault("partial_rotary_factor", 0.5)  # PhiConfig's default
    values["hidden_dropout"] = float(data.get("resid_pdrop") or 0.0)
    values["qk_norm"] = "head" if data.get("qk_layernorm") else None


def write_phi(c: ModelConfig, data: dict) -> None:
    for key in ("rms_norm_eps", "attention_bias", "mlp_bias", "head_dim"):
        data.pop(key, None)
    data.update(layer_norm_eps=c.rms_norm_eps, partial_rotary_factor=c.partial_rotary_factor,
                resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout, qk_layernorm=c.qk_norm == "head")


def phi_check(c: ModelConfig) -> str | None:
    """Phi's classes derive head_dim from hidden_size / heads (Phi-3 checks LongRoPE's factors by it)."""
    if c.hidden_size != c.heads(0) * c.resolved_head_dim:
        return "head_dim x heads differs from hidden_size"
    return None


def read_phi3(data: dict, values: dict) -> None:
    values["hidden_dropout"] = float(data.get("resid_pdrop") or 0.0)
    scaling = values.get("rope_scaling")
    if scaling and rope_type(scaling) in ("su", "yarn", "longrope"):  # Phi-3's old names for LongRoPE
        scaling = {k: v for k, v in scaling.items() if k != "type"}
        scaling["rope_type"] = "longrope"
        # the top-level field wins over the one inside, as in transformers (class default 4096)
        scaling["original_max_position_embeddings"] = int(data.get("original_max_position_embeddings", 4096))
        values["rope_scaling"] = scaling
    values["sliding_window"] = data.get("sliding_window")


def write_phi3(c: ModelConfig, data: dict) -> None:
    data.update(resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout, sliding_window=c.sliding_window,
                partial_rotary_factor=c.partial_rotary_factor)
    for key in ("attention_bias", "mlp_bias"):
        data.pop(key, None)
    if rope_type(c.rope_scaling) == "longrope":
        data["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]


# -- llama.cpp ---------------------------------------------------------------------------------


def longrope_magnitude(c: ModelConfig) -> float:
    s = c.rope_scaling
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or c.max_position_embeddings / original
    return s.get("attention_factor") or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))


def write_phi3_gguf(writer, c: ModelConfig) -> None:
    if rope_type(c.rope_scaling) != "longrope":
        writer.add_rope_scaling_orig_ctx_len(c.max_position_embeddings)
        return
    s = c.rope_scaling
    writer.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
    writer.add_rope_scaling_attn_factors(float(longrope_magnitude(c)))
    writer.add_tensor("rope_factors_long.weight", np.asarray(s["long_factor"], dtype=np.float32))
    writer.add_tensor("rope_factors_short.weight", np.asarray(s["short_factor"], dtype=np.float32))


def read_phi3_gguf(gguf, values: dict) -> None:
    if not gguf.has("rope_factors_long.weight"):
        return
    values["rope_scaling"] = {
        "rope_type": "longrope", "long_factor": gguf.tensor("rope_factors_long.weight").tolist(),
        "short_factor": gguf.tensor("rope_factors_short.weight").tolist(),
        "original_max_position_embeddings": int(gguf.key("rope.scaling.original_context_length")),
        "attention_factor": float(gguf.key("rope.scaling.attn_factor", 1.0))}


def refuse_phi2_gguf(c: ModelConfig) -> str | None:
    return "llama.cpp's phi2 graph has no q/k layernorms" if c.qk_norm else None


FAMILIES = [
    Family("phi", "PhiForCausalLM",
           GgufSpec("phi2", eps_key="attention.layer_norm_epsilon", output="required", full_width_q=True,
                    refuse=refuse_phi2_gguf, act="gelu_new"),
           fixed={"norm_type": "layer", "block_layout": "parallel", "gated_mlp": False, "attention_bias": True,
                  "attention_out_bias": True, "mlp_bias": True, "lm_head_bias": True},
           free=frozenset({"partial_rotary_factor", "qk_norm", "hidden_dropout", "hidden_act"}), read=read_phi,
           write=write_phi,
           renames=PHI2_NAMES, check=phi_check),
    Family("phi3", "Phi3ForCausalLM",
           GgufSpec("phi3", fused_ffn=True, full_width_q=True, write=write_phi3_gguf, read=read_phi3_gguf,
                    no_window=True),
           free=frozenset({"partial_rotary_factor", "sliding_window", "hidden_dropout", "hidden_act"}),
           rope_types=("default", "longrope"), read=read_phi3, write=write_phi3, fused=PHI3_FUSED, check=phi_check),
]

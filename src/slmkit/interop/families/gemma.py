"""Gemma 1, 2 and 3 (text).

All three: RMSNorm weights stored around zero and applied as 1 + w, embeddings scaled by
sqrt(hidden), GeGLU with the tanh GELU, tied embeddings. Gemma 2 adds the sandwich block (norms
before and after attention and MLP), soft caps on attention scores and logits, query_pre_attn_scalar
and alternating sliding-window layers; Gemma 3 drops the attention cap (transformers stores it but
never applies it), adds per-head q/k norms and gives its sliding layers their own RoPE base.

llama.cpp (src/models/gemma*.cpp): norms stored as 1 + w (q/k norms too in Gemma 3); NEOX RoPE;
the attention scale is hard-coded (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 46-layer
Gemma 2 and 62-layer Gemma 3), so another scale is folded into q; Gemma 1/2 have no output tensor
(always tied); Gemma 2's soft caps are always on (50 and 30 when the file does not say).
"""

from __future__ import annotations

import math

from slmkit.config import ModelConfig
from slmkit.interop.families.base import Family, GgufSpec, sqrt_hidden

GEMMA_FIXED = {"norm_type": "rms_offset", "embedding_multiplier": sqrt_hidden, "hidden_act": "gelu_pytorch_tanh"}
GEMMA2_FIXED = {**GEMMA_FIXED, "block_layout": "sandwich"}
NO_CAP = 1e6  # a soft cap llama.cpp cannot switch off, set where tanh(x / cap) * cap == x in fp32


def read_gemma(data: dict, values: dict) -> None:
    values["head_dim"] = data.get("head_dim", 256)


def read_gemma2(data: dict, values: dict) -> None:
    read_gemma(data, values)
    values["attention_multiplier"] = float(data.get("query_pre_attn_scalar", 256)) ** -0.5
    values["final_logit_softcapping"] = data.get("final_logit_softcapping")
    n = values["num_hidden_layers"]
    if data.get("model_type") == "gemma2":
        values["attn_logit_softcapping"] = data.get("attn_logit_softcapping")
        pattern = 2  # even layers slide
    else:  # Gemma 3 keeps the attention cap in its config but never applies it
        pattern = int(data.get("sliding_window_pattern") or data.get("_sliding_window_pattern") or 6)
        values.setdefault("rope_local_base_freq", 10000.0)
    values.setdefault("layer_types", ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)])
    values["sliding_window"] = data.get("sliding_window", 4096)


def write_gemma(c: ModelConfig, data: dict) -> None:
    data["hidden_activation"] = data["hidden_act"]
    data["head_dim"] = c.resolved_head_dim


def write_gemma2(c: ModelConfig, data: dict) -> None:
    write_gemma(c, data)
    data.update(query_pre_attn_scalar=round(_pre_attn_scalar(c)), final_logit_softcapping=c.final_logit_softcapping,
                sliding_window=c.sliding_window, layer_types=c.layer_types or ["full_attention"] * c.num_hidden_layers)
    if c.model_type == "gemma2" or c.attn_logit_softcapping is not None:
        data["attn_logit_softcapping"] = c.attn_logit_softcapping
    if c.rope_local_base_freq is not None:
        data["rope_local_base_freq"] = c.rope_local_base_freq


def _pre_attn_scalar(c: ModelConfig) -> float:
    return (c.attention_multiplier or c.resolved_head_dim ** -0.5) ** -2


def gemma2_check(c: ModelConfig) -> str | None:
    """transformers keeps query_pre_attn_scalar an integer."""
    scalar = _pre_attn_scalar(c)
    return None if abs(scalar - round(scalar)) < 1e-6 * scalar else f"attention scale 1/sqrt({scalar:g})"


# -- llama.cpp ---------------------------------------------------------------------------------


def llama_cpp_scale(c: ModelConfig) -> float:
    """The attention scale llama.cpp's gemma2/gemma3 graphs hard-code."""
    big = (c.model_type == "gemma2" and c.num_hidden_layers == 46) or c.num_hidden_layers == 62
    return (c.hidden_size / c.heads(0)) ** -0.5 if big else c.resolved_head_dim ** -0.5


def q_fold(c: ModelConfig) -> float:
    """What q must be multiplied by in the file for llama.cpp's scale to give ours."""
    return (c.attention_multiplier or c.resolved_head_dim ** -0.5) / llama_cpp_scale(c)


def write_gemma2_gguf(writer, c: ModelConfig) -> None:
    writer.add_attn_logit_softcapping(c.attn_logit_softcapping or NO_CAP)
    writer.add_final_logit_softcapping(c.final_logit_softcapping or NO_CAP)
    _write_windows(writer, c)


def write_gemma3_gguf(writer, c: ModelConfig) -> None:
    if c.final_logit_softcapping:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.rope_local_base_freq is not None:
        writer.add_rope_freq_base_swa(c.rope_local_base_freq)
    _write_windows(writer, c)


def _write_windows(writer, c: ModelConfig) -> None:
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
        writer.add_sliding_window_pattern([c.is_sliding(i) for i in range(c.num_hidden_layers)])


def read_gemma2_gguf(gguf, values: dict) -> None:
    values["attn_logit_softcapping"] = float(gguf.key("attn_logit_softcapping", 50.0))
    values["final_logit_softcapping"] = float(gguf.key("final_logit_softcapping", 30.0))
    _read_windows(gguf, values, 2, 4096)


def read_gemma3_gguf(gguf, values: dict) -> None:
    values["qk_norm"] = "head"
    cap = float(gguf.key("final_logit_softcapping", 0.0) or 0.0)
    values["final_logit_softcapping"] = cap or None
    values["rope_local_base_freq"] = float(gguf.key("rope.freq_base_swa", 10000.0))
    if gguf.key("attention.sliding_window"):
        _read_windows(gguf, values, 6, None)


def _read_windows(gguf, values: dict, period: int, default_window: int | None) -> None:
    """llama.cpp's SWA layers: a bool array, or every layer but the last of each `period`."""
    n = values["num_hidden_layers"]
    pattern = gguf.key("attention.sliding_window_pattern", period)
    sliding = [bool(x) for x in pattern] if isinstance(pattern, list) else [
        int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)]
    values["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    values["sliding_window"] = int(gguf.key("attention.sliding_window", default_window))


def import_scale(values: dict) -> float | None:
    """The scale a gemma2/3 GGUF runs with (llama.cpp's rule), as attention_multiplier (None: 1/sqrt(D))."""
    hidden, heads, layers = values["hidden_size"], values["num_attention_heads"], values["num_hidden_layers"]
    if layers in (46, 62):
        return math.sqrt(heads / hidden)
    return None


def read_big_gemma_gguf(read):
    def inner(gguf, values: dict) -> None:
        read(gguf, values)
        values["attention_multiplier"] = import_scale(values)
    return inner


FAMILIES = [
    Family("gemma", "GemmaForCausalLM",
           GgufSpec("gemma", norm_offset=True, output="never", act="gelu_pytorch_tanh"),
           fixed=GEMMA_FIXED, free=frozenset({"attention_bias"}), read=read_gemma, write=write_gemma,
           tie_default=True),
    Family("gemma2", "Gemma2ForCausalLM",
           GgufSpec("gemma2", norm_offset=True, output="never", write=write_gemma2_gguf, act="gelu_pytorch_tanh",
                    read=read_big_gemma_gguf(read_gemma2_gguf), q_scale=q_fold),
           fixed=GEMMA2_FIXED,
           free=frozenset({"attention_bias", "attention_multiplier", "attn_logit_softcapping",
                           "final_logit_softcapping", "sliding_window", "layer_types"}),
           read=read_gemma2, write=write_gemma2, tie_default=True, divisible_heads=True, check=gemma2_check),
    Family("gemma3_text", "Gemma3ForCausalLM",
           GgufSpec("gemma3", norm_offset=True, write=write_gemma3_gguf, read=read_big_gemma_gguf(read_gemma3_gguf),
                    act="gelu_pytorch_tanh",
                    q_scale=q_fold),
           fixed={**GEMMA2_FIXED, "qk_norm": "head"},
           free=frozenset({"attention_bias", "attention_multiplier", "final_logit_softcapping", "sliding_window",
                           "layer_types", "rope_local_base_freq"}),
           read=read_gemma2, write=write_gemma2, tie_default=True, divisible_heads=True, default_theta=1_000_000.0,
           check=gemma2_check,
           refused={"use_bidirectional_attention": (None, False)}),
]

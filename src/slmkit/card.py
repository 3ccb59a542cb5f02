"""Tables for people: the model card, `slm size` and the preset list (printed with rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from slmkit.config import ModelConfig
from slmkit.load import Source
from slmkit.presets import PRESETS
from slmkit.sizing import count_params, human_bytes, human_count, kv_cache_bytes, weight_bytes

console = Console(highlight=False)

PRECISIONS = (("fp32", 32), ("bf16", 16), ("int8", 8), ("int4", 4))


def _per_layer(value) -> str:
    return str(value) if isinstance(value, int) else f"{min(value)}..{max(value)} (per layer)"


MLP_NAMES = {"silu": "SwiGLU", "gelu_pytorch_tanh": "GeGLU (tanh GELU)", "gelu_new": "GeGLU (tanh GELU)",
             "gelu": "GeGLU"}
NORM_NAMES = {"rms": "RMSNorm", "rms_offset": "RMSNorm with 1 + w (Gemma)", "layer": "LayerNorm with bias"}
LAYOUT_NAMES = {"pre": "pre-norm", "sandwich": "sandwich: norms before and after attention and MLP",
                "post": "post-norm: each branch's output normalised", "parallel": "parallel attention + MLP"}


def architecture_rows(c: ModelConfig) -> list[tuple[str, str]]:
    kv = c.num_key_value_heads if c.num_key_value_heads is not None else c.num_attention_heads
    heads = c.num_attention_heads
    kind = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
    mlp = MLP_NAMES.get(c.hidden_act, c.hidden_act) if c.gated_mlp else f"{c.hidden_act} MLP (no gate)"
    rows = [
        ("family", c.model_type),
        ("layers x hidden", f"{c.num_hidden_layers} x {c.hidden_size}"),
        ("attention", f"{_per_layer(heads)} query / {_per_layer(kv)} key-value heads ({kind}), "
                      f"head dim {c.resolved_head_dim}"),
        ("feed-forward", f"{mlp} {_per_layer(c.intermediate_size)}" + (
            f", {c.num_local_experts} experts, top {c.num_experts_per_tok}" if c.num_local_experts else "")),
        ("block", f"{LAYOUT_NAMES[c.block_layout]}, {NORM_NAMES[c.norm_type]}"),
        ("vocabulary", f"{c.vocab_size:,} ({'tied' if c.tie_word_embeddings else 'untied'} embeddings)"),
        ("context", f"{c.max_position_embeddings:,} tokens, RoPE theta {c.rope_theta:g}"
                    + (f", {c.rope_scaling.get('rope_type')} scaling" if c.rope_scaling else "")),
    ]
    rows += switch_rows(c)
    if c.block_repeats > 1:
        rows.append(("block sharing", f"{c.num_blocks} blocks, each applied {c.block_repeats}x"))
    return rows


def switch_rows(c: ModelConfig) -> list[tuple[str, str]]:
    """The family's variations in use, each a row (nothing for a plain Llama)."""
    rows = []
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    biases = [name for name, on in (("q/k/v", c.attention_bias), ("output", out_bias), ("MLP", c.mlp_bias),
                                    ("head", c.lm_head_bias)) if on]
    if biases:
        rows.append(("biases", ", ".join(biases)))
    if c.qk_norm:
        rows.append(("q/k norms", "per head" if c.qk_norm == "head" else "over the whole projection"))
    if c.sliding_window:
        sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
        rows.append(("sliding window", f"{c.sliding_window:,} tokens in {sliding} of {c.num_hidden_layers} layers"))
    rope = []
    if c.partial_rotary_factor != 1.0:
        rope.append(f"rotates {int(c.resolved_head_dim * c.partial_rotary_factor)} of {c.resolved_head_dim} dims")
    if c.rope_local_base_freq is not None:
        rope.append(f"sliding layers' base {c.rope_local_base_freq:g}")
    if c.no_rope_layers is not None and not all(c.no_rope_layers):
        rope.append(f"none in layers {[i for i, r in enumerate(c.no_rope_layers) if not r]}")
    if rope:
        rows.append(("RoPE", "; ".join(rope)))
    scales = [f"{label} {value:g}" for label, value, plain in (
        ("embeddings x", c.embedding_multiplier, 1.0), ("residual branches x", c.residual_multiplier, 1.0),
        ("attention scale", c.attention_multiplier, None), ("logits /", c.logits_scaling, 1.0),
        ("attention soft cap", c.attn_logit_softcapping, None), ("logit soft cap", c.final_logit_softcapping, None))
        if value != plain]
    if scales:
        rows.append(("scales", ", ".join(scales)))
    return rows


def print_card(source: Source) -> None:
    c = source.config
    params = count_params(c)
    table = Table(title=f"{c.name or 'model'}  ({c.model_type})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("source", source.path)
    for key, value in architecture_rows(c):
        table.add_row(key, value)
    table.add_row("parameters", f"{params.total:,} ({human_count(params.total)}; "
                                f"{human_count(params.non_embedding)} without embeddings)")
    if source.file_bytes:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted((source.tensor_types or {}).items()))
        table.add_row("file size", human_bytes(source.file_bytes) + (f"  ({kinds} tensors)" if kinds else ""))
    def memory(names):
        return "   ".join(f"{n} {human_bytes(weight_bytes(params.total, b))}" for n, b in PRECISIONS if n in names)

    table.add_row("weights", memory(("fp32", "bf16")))
    table.add_row("weights quantized", memory(("int8", "int4")) + "  (+16-bit scale per 32)")
    table.add_row("KV cache (bf16)", f"{human_bytes(kv_cache_bytes(c, 1024))} per 1k tokens")
    console.print(table)


def print_size(c: ModelConfig, bits: int, group_size: int, context: int, batch: int, kv_bits: int) -> None:
    params = count_params(c)
    weights = weight_bytes(params.total, bits, group_size)
    kv = kv_cache_bytes(c, context, batch, kv_bits)
    table = Table(title=f"{c.name or 'model'} at {bits}-bit weights", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("parameters", f"{params.total:,} ({human_count(params.total)})")
    if params.active != params.total:
        table.add_row("active per token", f"{params.active:,} ({human_count(params.active)})")
    scale_note = f", +16-bit scale per {group_size}" if bits < 16 and group_size > 0 else ""
    table.add_row(f"weights ({bits} bit{scale_note})", human_bytes(weights))
    table.add_row(f"KV cache ({context:,} tokens x {batch}, {kv_bits} bit)", human_bytes(kv))
    table.add_row("total", human_bytes(weights + kv))
    console.print(table)


def _compact(value) -> str:
    return str(value) if isinstance(value, int) else f"{min(value)}-{max(value)}*"


def print_presets() -> None:
    table = Table(title="presets: architectures (smollm2-135m-instruct = bundled weights)", title_justify="left")
    for col in ("name", "parameters", "layers", "hidden", "heads q/kv", "vocab"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=True)
    notes = []
    for name, preset in PRESETS.items():
        c = preset.config
        kv = c.num_key_value_heads if c.num_key_value_heads is not None else c.num_attention_heads
        table.add_row(name, human_count(count_params(c).total), str(c.num_hidden_layers), str(c.hidden_size),
                      f"{_compact(c.num_attention_heads)}/{_compact(kv)}", f"{c.vocab_size:,}")
        if preset.note:
            notes.append(f"{name}: {preset.note}")
    console.print(table)
    console.print("* per-layer widths (layer-wise scaling)\n" + "\n".join(notes))

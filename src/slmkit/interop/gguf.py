"""GGUF (llama.cpp) import and export for `llama`-architecture models.

Import: metadata -> `ModelConfig`, the embedded byte-level BPE vocabulary -> `Tokenizer`, tensors
dequantized by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants) and
renamed to HF names, with q/k rows permuted back from ggml's interleaved RoPE layout.

Export: F32/F16 here (quantized types belong to `slmkit.compress`). The writer follows
llama.cpp's convert_hf_to_gguf.py: tensors in PyTorch [out, in] order (GGUFWriter reverses the
dims itself), 1-D tensors and norms in F32, tokenizer `gpt2` with an explicit `pre`. A factorized
(low-rank) model is refused: densify it first (`slmkit.compress.lowrank.densify`, `--densify`).

Memory: weights go tensor by tensor into a model built on the `meta` device, so loading needs
about one fp32 copy of the weights plus one tensor of scratch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer

# (gguf_name, fp32 array in PyTorch order) -> (array to store, GGMLQuantizationType)
Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, object]]

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF name (per block N) -> HF name.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_gate_inp": "block_sparse_moe.gate",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}  # (E, out, in) stacks


# ---------------------------------------------------------------------------------------------
# RoPE layout: HF rotate-half rows <-> ggml interleaved pairs
# ---------------------------------------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> GGUF: inside each head, row i pairs with i + D/2 becomes rows 2i, 2i+1."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF -> HF: the inverse of `permute_qk`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` for `path`, with one-line errors for missing, foreign or broken files."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SlmError(f"model file '{path}' not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SlmError(f"'{path}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise SlmError(f"'{path}' is not a readable GGUF file (truncated or corrupt: {err})") from err


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SlmError(f"GGUF architecture '{arch}' is not supported (slmkit imports 'llama' models)")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise SlmError("this GGUF carries per-dimension RoPE frequency factors (rope_freqs), "
                       "which slmkit does not import yet; use the model's HF directory instead")

    def key(name, default=None):
        return _field(reader, f"llama.{name}", default)

    tensor_names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    experts = int(key("expert_count", 0) or 0)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(embd.shape[1]), hidden_size=hidden,
        intermediate_size=int(key("expert_feed_forward_length") or key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=None if head_dim == hidden // heads else int(head_dim),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader),
        tie_word_embeddings="output.weight" not in tensor_names,
        num_local_experts=experts, num_experts_per_tok=int(key("expert_used_count", 2) or 2),
        bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
        model_type="mixtral" if experts else "llama", name=str(_field(reader, "general.name", "")),
    )


def _rope_scaling(reader) -> dict | None:
    kind = _field(reader, "llama.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor"))}
    raise SlmError(f"GGUF rope scaling '{kind}' is not supported (supported: none, linear)")


def read_tokenizer(reader) -> Tokenizer | None:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise SlmError(f"GGUF tokenizer '{kind}' is not supported (slmkit reads byte-level BPE, 'gpt2')")
    special = {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return Tokenizer.from_vocab(
        _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges", []),
        _field(reader, "tokenizer.ggml.token_type"), _field(reader, "tokenizer.ggml.pre", "default"),
        **special)


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise SlmError(f"GGUF tensor '{gguf_name}' has no place in a llama model")


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as a writable float32 array in PyTorch order (out, in)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise SlmError(f"GGUF tensor '{tensor.name}' has type {kind}, which slmkit cannot read "
                       f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    out = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only file map; copy those (and only those).
    return out.copy() if np.may_share_memory(out, tensor.data) else out


def read_tensors(reader, config: ModelConfig, dtype: torch.dtype):
    """Yield (hf_name, tensor) one at a time, un-permuting q/k and splitting expert stacks."""
    for t in reader.tensors:
        weight = torch.from_numpy(dequantize(t))
        base = t.name.rsplit(".", 1)[0]
        kind = base.split(".")[-1]
        if kind in EXPERT_NAMES:  # (E, out, in) -> one Linear per expert
            layer = base.split(".")[1]
            for e in range(weight.shape[0]):
                yield (f"model.layers.{layer}.block_sparse_moe.experts.{e}.{EXPERT_NAMES[kind]}.weight",
                       weight[e].to(dtype).clone())
            continue
        name = hf_name(t.name)
        if kind in ("attn_q", "attn_k") and name.endswith("weight"):
            heads = config.heads(0) if kind == "attn_q" else config.kv_heads(0)
            weight = unpermute_qk(weight, heads)
        yield name, weight.to(dtype)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def gguf_name(hf: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    base, _, suffix = hf.rpartition(".")
    for g, h in TOP_NAMES.items():
        if base == h:
            return f"{g}.{suffix}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    inverse = {h: g for g, h in BLOCK_NAMES.items()}
    if match and match.group(2) in inverse:
        return f"blk.{match.group(1)}.{inverse[match.group(2)]}.{suffix}"
    if match and match.group(2) in EXPERT_NAMES:  # an expert stack made by _expert_stack
        return f"blk.{match.group(1)}.{match.group(2)}.{suffix}"
    raise SlmError(f"tensor '{hf}' has no GGUF llama name")


def check_exportable(config: ModelConfig) -> None:
    if config.lowrank:
        raise SlmError("this model is factorized (low-rank down/up pairs), which llama.cpp's llama graph cannot run; "
                       "export it with `slm export gguf MODEL OUT.gguf --densify` (multiplies the factors back "
                       "into full matrices: same outputs, the original size)")
    if not config.is_uniform:
        raise SlmError("GGUF llama needs the same shape in every layer and no shared blocks; "
                       "this model uses layer-wise widths or block sharing")
    if config.attention_bias or config.mlp_bias:
        raise SlmError("GGUF llama export does not carry attention/MLP biases")
    if config.sliding_window:
        raise SlmError("llama.cpp's llama graph has no sliding window; export would change the model")
    if config.rope_scaling and config.rope_scaling.get("rope_type", config.rope_scaling.get("type")) != "linear":
        raise SlmError("only linear rope scaling can be written to GGUF llama metadata")


def write_gguf(model, tokenizer: Tokenizer, path: str | Path, file_type: str = "f16",
               encode: Encoder | None = None, file_type_id: int | None = None) -> Path:
    """Write `model` (+ tokenizer) as a llama GGUF, atomically.

    file_type: f32, f16, q8_0, q4_0, q4_1 or q4_k_m (see `gguf_quants`); 1-D tensors stay F32.
    `encode` overrides the per-tensor choice, (gguf_name, fp32 array) -> (array, GGMLQuantizationType),
    with `file_type_id` the llama.cpp file type to record. A quantized slmkit model is exported
    from its dequantized weights (the GGUF type then decides the final rounding).
    """
    import gguf

    from slmkit.interop import gguf_quants as gq

    if encode is None and file_type not in gq.FTYPES:
        raise SlmError(f"GGUF type '{file_type}' is not supported (choose from {', '.join(gq.FTYPES)})")
    config: ModelConfig = model.config
    check_exportable(config)
    tensors = [(gguf_name(name), tensor) for name, tensor in _export_tensors(model)]
    if encode is None:
        gq.check_shapes([(name, tuple(t.shape)) for name, t in tensors], file_type)
        encode = plain_encoder(file_type) if file_type in ("f32", "f16") else quantized_encoder(
            file_type, config.num_hidden_layers, any(name == "output.weight" for name, _ in tensors))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _write_metadata(writer, config, gq.FTYPES.get(file_type, 0) if file_type_id is None else file_type_id)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in tensors:
        data, kind = encode(name, tensor.detach().float().cpu().numpy())
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
    return path


def quantized_encoder(file_type: str, n_layers: int, has_output: bool) -> Encoder:
    import gguf

    from slmkit.interop import gguf_quants as gq

    def encode(name: str, data: np.ndarray):
        kind = gq.tensor_type(name, data.shape, file_type, n_layers, has_output)
        return gq.encode(data, kind), getattr(gguf.GGMLQuantizationType, kind)

    return encode


def plain_encoder(file_type: str) -> Encoder:
    import gguf

    def encode(_name: str, data: np.ndarray):
        if file_type == "f16" and data.ndim >= 2:
            return data.astype(np.float16), gguf.GGMLQuantizationType.F16
        return data, gguf.GGMLQuantizationType.F32

    return encode


def _export_tensors(model):
    """(hf_name, tensor) in GGUF layout: q/k permuted, experts stacked into (E, out, in)."""
    config = model.config
    state = float_state(model)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        match = re.fullmatch(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight", name)
        if match:
            if match.group(2) == "0":  # emit the whole stack once, at the first expert
                yield from _expert_stack(state, match.group(1), match.group(3), config.num_local_experts)
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.heads(0) if "q_proj" in name else config.kv_heads(0)
            tensor = permute_qk(tensor, heads)
        yield name, tensor


def float_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with quantized linears given back as float `weight`s."""
    from slmkit.compress.quant.qlinear import quantized_modules

    state = dict(model.state_dict())
    for name, module in quantized_modules(model):
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state[f"{name}.weight"] = module.dequantized()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
    return state


def _expert_stack(state, prefix: str, w: str, n_experts: int):
    kind = {v: k for k, v in EXPERT_NAMES.items()}[w]
    stack = torch.stack([state[f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(n_experts)])
    yield f"{prefix}.{kind}.weight", stack


def _write_metadata(writer, c: ModelConfig, file_type: int) -> None:
    writer.add_name(c.name or "slmkit-model")
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.ffn_size(0))
    writer.add_head_count(c.heads(0))
    writer.add_head_count_kv(c.kv_heads(0))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.resolved_head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)
    if c.num_local_experts:
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if c.head_dim and c.head_dim != c.hidden_size // c.heads(0):
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if c.rope_scaling:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def _write_tokenizer(writer, tok: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp reads it; the token list is padded to the embedding rows."""
    if tok.pre is None:
        raise SlmError("the tokenizer's pre-tokenizer is not one llama.cpp knows; cannot write GGUF")
    import json

    data = json.loads(tok.backend.to_str())
    tokens = [""] * vocab_size
    types = [5] * vocab_size  # 5 = unused
    if tok.vocab_size > vocab_size:
        raise SlmError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} embeddings")
    for token, i in data["model"]["vocab"].items():
        tokens[i], types[i] = token, 1
    for added in data.get("added_tokens", []):
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added["special"] else 4
    tokens = [t or f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

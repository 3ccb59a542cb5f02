"""GGUF (llama.cpp) import and export for every family `slmkit.interop.families` knows.

Import: metadata -> `ModelConfig` (the keys every architecture shares here, the rest through the
family's `GgufSpec.read`), the embedded vocabulary -> `Tokenizer` (`gguf_vocab`), tensors
dequantized by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants) and
renamed to HF names, undoing what the architecture's converter did: q/k rows permuted back from
ggml's paired RoPE layout (NORM-RoPE archs), 1 subtracted from Gemma's norms, fused q/k/v and
Phi-3's [gate; up] split.

Export: F32/F16 here (quantized types belong to `gguf_quants`), written as the architecture of the
family that holds the model (`export_family`), the reverse of each import step, plus what the
arch's graph needs beside the weights (Llama 3's `rope_freqs`, LongRoPE's factor tensors, Gemma's
attention scale folded into q, which llama.cpp hard-codes). Like llama.cpp's convert_hf_to_gguf.py:
tensors in PyTorch [out, in] order (GGUFWriter reverses the dims itself), 1-D tensors in F32. A
model llama.cpp would run differently is refused with the reason (`check_exportable`); an arch
whose graph has no sliding window gets the window as its context length, where it changes nothing.

Memory: weights go tensor by tensor into a model built on the `meta` device, so loading needs
about one fp32 copy of the weights plus one tensor of scratch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from slmkit.compress.quant.qlinear import quantized_modules
from slmkit.config import ModelConfig, from_dict, rope_type
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write
from slmkit.interop import gguf_quants as gq
from slmkit.interop.families import GgufSpec, export_family, family_of, gguf_family
from slmkit.interop.gguf_file import GgufContents
from slmkit.interop.gguf_vocab import field, read_tokenizer, write_tokenizer  # noqa: F401 (read_tokenizer re-exported)
from slmkit.rope import yarn_factor
from slmkit.tokenizer import Tokenizer

# (gguf_name, fp32 array in PyTorch order) -> (array to store, GGMLQuantizationType)
Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, object]]

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}  # (E, out, in) stacks
TANH_GELU = {"gelu_new": "gelu_pytorch_tanh"}  # two names of one function
NOT_WEIGHTS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # RoPE tables


def block_names(c: ModelConfig) -> dict[str, str]:
    """GGUF name -> our module path inside block N. HF's `post_attention_layernorm` feeds the MLP
    in the pre-norm layout (GGUF `ffn_norm`) but follows attention in Gemma 2/3 and OLMo-2."""
    names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "ffn_gate_inp": "block_sparse_moe.gate",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
    if c.block_layout == "pre":
        names["ffn_norm"] = "post_attention_layernorm"
    else:
        names["post_attention_norm"] = "post_attention_layernorm"
        names["ffn_norm"] = "pre_feedforward_layernorm"
    return names


# ---------------------------------------------------------------------------------------------
# RoPE layout: HF rotate-half rows <-> ggml interleaved pairs
# ---------------------------------------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> GGUF: inside each head, row i pairs with i + D/2 becomes rows 2i, 2i+1 (biases too)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF -> HF: the inverse of `permute_qk`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def open_gguf(path: str | Path) -> GgufContents:
    """The metadata and tensor index of `path` (`gguf_file`), with one-line errors for missing, foreign
    or broken files."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"model file '{path}' not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SlmError(f"'{path}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GgufContents(path)
    except Exception as err:  # bad bytes raise ValueError/IndexError/struct errors
        raise SlmError(f"'{path}' is not a readable GGUF file (truncated or corrupt: {err})") from err


class GgufFields:
    """What a family's read hook sees: the arch's keys, tensor names, small tensors."""

    def __init__(self, reader, arch: str):
        self.reader, self.arch = reader, arch
        self.tensors = {t.name: t for t in reader.tensors}

    def key(self, name: str, default=None):
        return field(self.reader, f"{self.arch}.{name}", default)

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors

    def tensor(self, name: str) -> np.ndarray:
        return dequantize(self.tensors[name])


def read_config(reader) -> ModelConfig:
    arch = field(reader, "general.architecture")
    experts = int(field(reader, f"{arch}.expert_count", 0) or 0)
    family = gguf_family(arch, bool(experts))
    g = GgufFields(reader, arch)
    values = _common_values(g, family, experts)
    values.update({k: v for k, v in family.fixed.items() if not callable(v)})
    if family.gguf.read:
        family.gguf.read(g, values)
    config = from_dict(ModelConfig, values)
    derived = {k: v(config) for k, v in family.fixed.items() if callable(v)}
    return config.replace(**derived) if derived else config


def _common_values(g: GgufFields, family, experts: int) -> dict:
    embd = g.tensors["token_embd.weight"]
    heads, hidden = int(g.key("attention.head_count")), int(g.key("embedding_length"))
    head_dim = int(g.key("attention.key_length") or hidden // heads)
    rotary = int(g.key("rope.dimension_count") or head_dim)
    bos, eos = field(g.reader, "tokenizer.ggml.bos_token_id"), field(g.reader, "tokenizer.ggml.eos_token_id")
    values = dict(
        vocab_size=int(embd.shape[1]), hidden_size=hidden,
        intermediate_size=_ffn_size(g),
        num_hidden_layers=int(g.key("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g.key("attention.head_count_kv", heads)),
        head_dim=None if head_dim == hidden // heads else head_dim, partial_rotary_factor=rotary / head_dim,
        max_position_embeddings=int(g.key("context_length", 2048)),
        rms_norm_eps=float(g.key(family.gguf.eps_key, 1e-5)), rope_theta=float(g.key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(g), tie_word_embeddings=not g.has("output.weight"),
        lm_head_bias=g.has("output.bias"), num_local_experts=experts, hidden_act=family.gguf.act,
        num_experts_per_tok=int(g.key("expert_used_count", 2) or 2),
        bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
        model_type=family.model_type, name=str(field(g.reader, "general.name", "")),
    )
    biases = {name.split(".")[2] for name in g.tensors if name.startswith("blk.0.") and name.endswith(".bias")}
    values["attention_bias"] = bool(biases & {"attn_q", "attn_k", "attn_v", "attn_qkv"})
    values["attention_out_bias"] = "attn_output" in biases
    values["mlp_bias"] = bool(biases & {"ffn_up", "ffn_down", "ffn_gate"})
    return values


def _ffn_size(g: GgufFields) -> int:
    """The MLP width, from ffn_down's shape where there is one: llama.cpp's phi2 converter writes
    4 x hidden whatever the model has."""
    down = g.tensors.get("blk.0.ffn_down.weight")
    if down is not None:
        return int(down.shape[0])  # ggml order: (n_ff, n_embd)
    return int(g.key("expert_feed_forward_length") or g.key("feed_forward_length"))


def _rope_scaling(g: GgufFields) -> dict | None:
    kind = g.key("rope.scaling.type")
    factor = float(g.key("rope.scaling.factor", 0.0) or 0.0)
    if kind in (None, "none", "linear") and factor in (0.0, 1.0):  # llama.cpp: no factor means no scaling
        return None
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": int(g.key("rope.scaling.original_context_length")),
                "beta_fast": float(g.key("rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(g.key("rope.scaling.yarn_beta_slow", 1.0))}
    raise SlmError(f"GGUF rope scaling '{kind}' is not supported (supported: none, linear, yarn)")


def hf_name(gguf_name: str, c: ModelConfig) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    names = block_names(c)
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise SlmError(f"GGUF tensor '{gguf_name}' has no place in a {c.model_type} model")


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as a writable float32 array in PyTorch order (out, in)."""
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise SlmError(f"GGUF tensor '{tensor.name}' has type {kind}, which slmkit cannot read "
                       f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    out = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only file map; copy those (and only those).
    return out.copy() if np.may_share_memory(out, tensor.data) else out


def read_tensors(reader, config: ModelConfig, dtype: torch.dtype):
    """Yield (hf_name, tensor) one at a time, undoing the arch's converter (see the module docstring)."""
    spec = gguf_family(field(reader, "general.architecture"), bool(config.num_local_experts)).gguf
    for t in reader.tensors:
        if t.name in NOT_WEIGHTS:
            continue
        weight = torch.from_numpy(dequantize(t))
        base = t.name.rsplit(".", 1)[0]
        kind = base.split(".")[-1]
        if kind in EXPERT_NAMES:  # (E, out, in) -> one Linear per expert
            layer = base.split(".")[1]
            for e in range(weight.shape[0]):
                yield (f"model.layers.{layer}.block_sparse_moe.experts.{e}.{EXPERT_NAMES[kind]}.weight",
                       weight[e].to(dtype).clone())
            continue
        for name, part in _unfused(t.name, weight, config, spec):
            yield name, _from_file(name, part, config, spec).to(dtype)


def _unfused(name: str, weight: torch.Tensor, c: ModelConfig, spec: GgufSpec):
    """attn_qkv -> q, k, v; Phi-3's ffn_up -> gate, up (llama.cpp keeps both fused)."""
    d = c.resolved_head_dim
    if ".attn_qkv." in name:
        sizes = [c.heads(0) * d, c.kv_heads(0) * d, c.kv_heads(0) * d]
        for kind, part in zip(("attn_q", "attn_k", "attn_v"), weight.split(sizes)):
            yield hf_name(name.replace("attn_qkv", kind), c), part
    elif ".ffn_up." in name and spec.fused_ffn:
        gate, up = weight.split(c.ffn_size(0))
        yield hf_name(name.replace("ffn_up", "ffn_gate"), c), gate
        yield hf_name(name, c), up
    else:
        yield hf_name(name, c), weight


def _from_file(name: str, w: torch.Tensor, c: ModelConfig, spec: GgufSpec) -> torch.Tensor:
    if spec.permute_qk and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
        w = unpermute_qk(w, c.heads(0) if ".q_proj." in name else c.kv_heads(0))
    if spec.norm_offset and _is_norm(name):
        w = w - 1.0
    return w


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight",))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def gguf_name(hf: str, c: ModelConfig) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    base, _, suffix = hf.rpartition(".")
    for g, h in TOP_NAMES.items():
        if base == h:
            return f"{g}.{suffix}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    inverse = {h: g for g, h in block_names(c).items()}
    if match and match.group(2) in inverse:
        return f"blk.{match.group(1)}.{inverse[match.group(2)]}.{suffix}"
    if match and match.group(2) in EXPERT_NAMES:  # an expert stack made by _expert_stack
        return f"blk.{match.group(1)}.{match.group(2)}.{suffix}"
    raise SlmError(f"tensor '{hf}' has no GGUF name")


def gguf_spec(config: ModelConfig) -> GgufSpec:
    """The llama.cpp architecture `config` is written as, after `check_exportable`."""
    return export_family(config).gguf


def check_exportable(config: ModelConfig) -> None:
    """Refuse, with the reason, a model llama.cpp cannot run as it is."""
    if config.lowrank:
        raise SlmError("this model is factorized (low-rank down/up pairs), which llama.cpp's graphs cannot run; "
                       "export it with `slm export gguf MODEL OUT.gguf --densify` (multiplies the factors back "
                       "into full matrices: same outputs, the original size)")
    if not config.is_uniform:
        raise SlmError("GGUF needs the same shape in every layer and no shared blocks; "
                       "this model uses layer-wise widths or block sharing")
    family = export_family(config)
    if family is None or family.gguf is None:
        raise SlmError(f"no llama.cpp architecture runs this {config.model_type} model as it is "
                       f"({_first_mismatch(config)}); run it with the torch engine")
    reason = _refusal(config, family.gguf)
    if reason:
        raise SlmError(f"cannot write this model as GGUF {family.gguf.arch}: {reason}")


def _first_mismatch(config: ModelConfig) -> str:
    return family_of(config).mismatch(config) or "its layout"


def _refusal(c: ModelConfig, spec: GgufSpec) -> str | None:
    kind = rope_type(c.rope_scaling)
    if kind == "longrope" and spec.arch != "phi3" or kind == "llama3" and spec.arch not in ("llama", "granite"):
        return f"llama.cpp's {spec.arch} graph has no {kind} RoPE scaling"
    if spec.output == "never" and not c.tie_word_embeddings:
        return "its output head is not the embedding, and llama.cpp's graph always ties them"
    if spec.full_width_q and c.heads(0) * c.resolved_head_dim != c.hidden_size:
        return "llama.cpp's graph needs heads x head_dim equal to the hidden size"
    if c.partial_rotary_factor != 1.0 and spec.arch not in ("phi2", "phi3"):
        return "llama.cpp's graph rotates whole heads (partial_rotary_factor is not 1)"
    if TANH_GELU.get(c.hidden_act, c.hidden_act) != TANH_GELU.get(spec.act, spec.act):
        return f"its MLP uses {c.hidden_act}, and llama.cpp's graph {spec.act}"
    return spec.refuse(c) if spec.refuse else None


def exported_context(c: ModelConfig, spec: GgufSpec) -> int:
    """The context length written: the sliding window where the arch's graph has none (there the
    window never masks anything, so llama.cpp runs exactly this model)."""
    sliding = any(c.is_sliding(i) for i in range(c.num_hidden_layers))
    if spec.no_window and sliding:
        return min(c.max_position_embeddings, c.sliding_window)
    return c.max_position_embeddings


def write_gguf(model, tokenizer: Tokenizer, path: str | Path, file_type: str = "f16",
               encode: Encoder | None = None, file_type_id: int | None = None,
               log: Callable[[str], None] | None = None) -> Path:
    """Write `model` (+ tokenizer) as GGUF of its family's llama.cpp architecture, atomically.

    file_type: f32, f16, q8_0, q4_0, q4_1 or q4_k_m (see `gguf_quants`); 1-D tensors stay F32.
    `encode` overrides the per-tensor choice, (gguf_name, fp32 array) -> (array, GGMLQuantizationType),
    with `file_type_id` the llama.cpp file type to record. A quantized slmkit model's codes are
    written as they are where the type's blocks hold its grid (int8 -> q8_0, int4 -> q4_1); other
    types round its dequantized weights again, and `log` says by how much.
    """
    if encode is None and file_type not in gq.FTYPES:
        raise SlmError(f"GGUF type '{file_type}' is not supported (choose from {', '.join(gq.FTYPES)})")
    config: ModelConfig = model.config
    check_exportable(config)
    spec = gguf_spec(config)
    tensors = list(export_tensors(model, spec))
    rounding = Rounding(file_type)
    if encode is None:
        gq.check_shapes([(name, tuple(t.shape)) for name, t, _ in tensors], file_type)
        encode = plain_encoder(file_type) if file_type in ("f32", "f16") else quantized_encoder(
            file_type, config.num_hidden_layers, any(name == "output.weight" for name, _, _ in tensors),
            {name: grid for name, _, grid in tensors if grid is not None}, rounding)
    def fill(writer: gguf.GGUFWriter) -> None:
        _write_metadata(writer, config, spec, gq.FTYPES.get(file_type, 0) if file_type_id is None else file_type_id)
        write_tokenizer(writer, tokenizer, config.vocab_size)
        for name, tensor, _ in tensors:
            data, kind = encode(name, tensor.detach().float().cpu().numpy())
            writer.add_tensor(name, data, raw_dtype=kind)
    path = write_gguf_file(path, spec.arch, fill)
    if rounding.note():
        (log or _stderr)(rounding.note())
    return path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Rounding:
    """What a quantized export did with a quantized model's codes: how many matrices it wrote on
    their own grid, and the error of those it had to round again (relative RMS over all of them)."""

    def __init__(self, file_type: str):
        self.file_type, self.exact, self.again = file_type, 0, 0
        self.error = self.norm = 0.0

    def rounded_again(self, data: np.ndarray, stored: np.ndarray) -> None:
        self.again += 1
        self.error += float(np.square(stored - data).sum())
        self.norm += float(np.square(data).sum())

    def note(self) -> str:
        if not self.again:
            return ""
        rel = (self.error / max(self.norm, 1e-30)) ** 0.5
        return (f"GGUF {self.file_type} cannot hold the grid of {self.again} quantized matrices, so they are rounded "
                f"a second time: relative RMS error {100 * rel:.2f}% of the weights ({self.exact} written exactly; "
                "int8 models keep their codes as q8_0, int4 ones as q4_1)")


def write_gguf_file(path: str | Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """A GGUF file written atomically: `fill(writer)` adds the metadata and tensors."""
    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    path = Path(path)
    atomic_write(path, write)
    return path


def quantized_encoder(file_type: str, n_layers: int, has_output: bool, grids: dict[str, gq.Grid] | None = None,
                      rounding: Rounding | None = None) -> Encoder:
    """Each tensor in its type of the `file_type` mix; a quantized matrix (its `grids` entry) on its
    own grid where the type can hold it, else rounded again (counted in `rounding`)."""
    grids, rounding = grids or {}, rounding or Rounding(file_type)

    def encode(name: str, data: np.ndarray):
        kind = gq.tensor_type(name, data.shape, file_type, n_layers, has_output)
        grid = grids.get(name)
        if grid is not None and grid.bits == 8 and kind == "Q6_K":
            kind = "Q8_0"  # an int8 head keeps its own codes rather than losing two bits
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        exact = None if grid is None else gq.encode_on_grid(data, kind, grid)
        if exact is not None:
            rounding.exact += 1
            return exact, qtype
        raw = gq.encode(data, kind)
        if grid is not None:
            rounding.rounded_again(data, np.asarray(gguf.quants.dequantize(raw, qtype)).reshape(data.shape))
        return raw, qtype

    return encode


def plain_encoder(file_type: str) -> Encoder:
    def encode(_name: str, data: np.ndarray):
        if file_type == "f16" and data.ndim >= 2:
            return data.astype(np.float16), gguf.GGMLQuantizationType.F16
        return data, gguf.GGMLQuantizationType.F32

    return encode


def export_tensors(model, spec: GgufSpec):
    """(gguf_name, tensor, grid) in the arch's layout (see the module docstring); experts stacked into
    (E, out, in); grid: the quantization grid of a quantized linear's weight (else None)."""
    config = model.config
    state, grids = float_state(model)
    if config.tie_word_embeddings:
        if "model.embed_tokens.weight" not in state:  # a tied quantized head: its table is the embedding
            state["model.embed_tokens.weight"] = state["lm_head.weight"]
            grids["model.embed_tokens.weight"] = grids.pop("lm_head.weight")
        del state["lm_head.weight"]
        if spec.output == "required":  # the graph wants its own head tensor: a copy of the embedding
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
            grids["lm_head.weight"] = grids.get("model.embed_tokens.weight")
    if spec.fused_ffn:
        _fuse_gate_up(state, grids)
    for name, tensor in state.items():
        match = re.fullmatch(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight", name)
        if match:
            if match.group(2) == "0":  # emit the whole stack once, at the first expert
                for stack_name, stack in _expert_stack(state, match.group(1), match.group(3), config.num_local_experts):
                    yield gguf_name(stack_name, config), stack, None
            continue
        grid = grids.get(name)
        yield (gguf_name(name, config), to_file(name, tensor, config, spec),
               None if grid is None else grid.rows(lambda t, name=name: to_file(name, t, config, spec)))


def to_file(name: str, w: torch.Tensor, c: ModelConfig, spec: GgufSpec) -> torch.Tensor:
    """One of our tensors as the arch's converter would write it."""
    if spec.norm_offset and _is_norm(name):
        w = w + 1.0
    fold = spec.q_scale(c) if spec.q_scale else 1.0
    if fold != 1.0 and (name.endswith("q_norm.weight") if c.qk_norm else ".q_proj." in name):
        w = w * fold  # llama.cpp's fixed attention scale times this is ours (RoPE and the q norm are linear in it)
    if spec.permute_qk and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
        w = permute_qk(w, c.heads(0) if ".q_proj." in name else c.kv_heads(0))
    return w


def _fuse_gate_up(state: dict[str, torch.Tensor], grids: dict[str, gq.Grid]) -> None:
    """Phi-3 in llama.cpp: one ffn_up of [gate; up] rows (its swiglu takes the first half as the gate)."""
    for gate in [k for k in state if k.endswith("mlp.gate_proj.weight")]:
        up = gate.replace("gate_proj", "up_proj")
        state[up] = torch.cat([state.pop(gate), state[up]])
        g, u = grids.pop(gate, None), grids.pop(up, None)
        if g is not None and u is not None and (g.group, g.bits, g.m is None) == (u.group, u.bits, u.m is None):
            grids[up] = gq.Grid(torch.cat([g.d, u.d]), None if g.m is None else torch.cat([g.m, u.m]), g.group, g.bits)


def float_state(model) -> tuple[dict[str, torch.Tensor], dict[str, gq.Grid]]:
    """The model's state dict with quantized linears given back as float `weight`s, and the grid
    each of those weights lies on (by weight name)."""
    state, grids = dict(model.state_dict()), {}
    for name, module in quantized_modules(model):
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state[f"{name}.weight"] = module.dequantized()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
        grid = grid_of(module)
        if grid is not None:
            grids[f"{name}.weight"] = grid
    return state, grids


def grid_of(module) -> gq.Grid | None:
    """int8: per-row scales, symmetric; int4: per-group scale and zero (w = s q - s z)."""
    if module.bits == 8:
        return gq.Grid(module.scales.float()[:, None], None, module.in_features, 8)
    scales = module.scales.float()
    return gq.Grid(scales, -scales * module.zeros.float(), module.group_size, 4)


def _expert_stack(state, prefix: str, w: str, n_experts: int):
    kind = {v: k for k, v in EXPERT_NAMES.items()}[w]
    stack = torch.stack([state[f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(n_experts)])
    yield f"{prefix}.{kind}.weight", stack


def _write_metadata(writer, c: ModelConfig, spec: GgufSpec, file_type: int) -> None:
    writer.add_name(c.name or "slmkit-model")
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    writer.add_context_length(exported_context(c, spec))
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.ffn_size(0))
    writer.add_head_count(c.heads(0))
    writer.add_head_count_kv(c.kv_heads(0))
    writer.add_float32(f"{spec.arch}.{spec.eps_key}", c.rms_norm_eps)
    writer.add_rope_dimension_count(int(c.resolved_head_dim * c.partial_rotary_factor))
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_key_length(c.resolved_head_dim)
    writer.add_value_length(c.resolved_head_dim)
    writer.add_vocab_size(c.vocab_size)
    if c.num_local_experts:
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    _write_rope_scaling(writer, c)
    if spec.write:
        spec.write(writer, c)


def _write_rope_scaling(writer, c: ModelConfig) -> None:
    """linear and YaRN are metadata; Llama 3's and LongRoPE's are tensors (the arch's write hook)."""
    kind, s = rope_type(c.rope_scaling), c.rope_scaling
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(s["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(yarn_factor(s, c.max_position_embeddings)))
        writer.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow") or 1))

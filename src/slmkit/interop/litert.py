"""LiteRT (TensorFlow Lite's successor) export: one `.tflite` file that LiteRT's interpreter runs on
Android, iOS and embedded Linux, converted by Google's converter (litert-torch), with the tokenizer
beside it (OUT_tokenizer/, `interop.phone`).

Why a second traced module and not ExecuTorch's: LiteRT's converter lowers through StableHLO, which
has neither mutable buffers nor data-dependent slices. So here the KV caches are inputs and outputs
of the program, (1, K, L, D) per layer, the new keys are written by a one-hot product over the L
slots (no scatter), attention reads all L slots under a mask of positions, and shapes are static:
the file has two signatures, `prefill` (PREFILL tokens at once; a shorter prompt is padded, and the
pad slots are overwritten by the tokens that follow before any query can see them) and `decode`
(one token). Both return the logits of every token they read and the new caches.

Weights: fp32, `int8` (int8 weights per channel, activations quantized at run time) or `int4` (int4
weights in blocks of 32, activations as int8), litert-torch's own quantization recipes.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.phone import check_target, put_in_place, traced_refusal, write_sidecar
from slmkit.model import Attention, CausalLM, LayerInputs
from slmkit.rope import apply_rope, rope_cos_sin

LITERT_PRECISIONS = ("fp32", "int8", "int4")
INSTALL = "pip install -e '.[litert]'"
PREFILL = 32  # tokens the prefill signature reads at once
DEFAULT_MAX_SEQ_LEN = 512


def litert_missing() -> str | None:
    for module in ("litert_torch", "ai_edge_litert"):
        if importlib.util.find_spec(module) is None:
            return f"LiteRT export and runs need litert-torch and ai-edge-litert ({module} is missing): {INSTALL}"
    return None


def check_litert_target(out: str | Path, force: bool) -> None:
    check_target(out, ".tflite", force, "a LiteRT model")
    missing = litert_missing()
    if missing:
        raise SlmError(missing)


class CacheIOAttention(nn.Module):
    """An `Attention` whose cache comes in and goes out: the caller sets `io` = (keys, values, slots)
    before the block runs and reads `out` = (new keys, new values) after it."""

    def __init__(self, attn: Attention, window: int | None):
        super().__init__()
        self.attn, self.window, self.io, self.out = attn, window, None, None

    def forward(self, x, cos, sin, mask, is_causal, kv, start):
        a = self.attn
        k_cache, v_cache, slots = self.io  # (1, K, L, D) each, slots (T,)
        b, t, _ = x.shape
        q = a._heads(x, a.q_proj, "q_norm", a.n_heads)  # (1, H, T, D)
        k = a._heads(x, a.k_proj, "k_norm", a.n_kv_heads)  # (1, K, T, D)
        v = a.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = torch.arange(k_cache.shape[2])  # (L,)
        onehot = (keys[:, None] == slots[None, :]).to(k.dtype)  # (L, T): slot l takes token t
        keep = (1 - onehot.sum(-1))[:, None]  # (L, 1)
        k_cache = k_cache * keep + torch.einsum("lt,bktd->bkld", onehot, k)
        v_cache = v_cache * keep + torch.einsum("lt,bktd->bkld", onehot, v)
        self.out = (k_cache, v_cache)
        allowed = keys[None, :] <= slots[:, None]  # (T, L)
        if self.window is not None:
            allowed = allowed & (slots[:, None] - keys[None, :] < self.window)
        groups = a.n_heads // a.n_kv_heads
        kc, vc = (c.repeat_interleave(groups, dim=1) for c in (k_cache, v_cache))  # (1, H, L, D)
        scores = (q @ kc.transpose(-1, -2)) * (a.scale or a.head_dim ** -0.5)  # (1, H, T, L)
        if a.softcap is not None:
            scores = torch.tanh(scores / a.softcap) * a.softcap
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vc  # (1, H, T, D)
        return a.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class CacheIOLM(nn.Module):
    """`forward(tokens (1, T), positions (T,), *caches) -> (logits (1, T, V), *new caches)`, caches as
    keys, values of layer 0, keys, values of layer 1, ... (the model is changed in place)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.lm = model
        for block in model.model.layers:
            block.self_attn = CacheIOAttention(block.self_attn, model.config.sliding_window if block.sliding else None)
        self.magnitudes = {}
        for kind, table in model.rotary.items():
            self.register_buffer(f"inv_freq_{kind}", table.inv_freq.clone(), persistent=False)
            self.magnitudes[kind] = table.magnitude
        model.rotary = nn.ModuleDict()  # its key "global" is a Python keyword, which traced code cannot name

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *caches: torch.Tensor):
        x = self.lm.embed(tokens)  # (1, T, C)
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions[None], x.dtype, m)
                for kind, m in self.magnitudes.items()}
        inputs = LayerInputs(rope, {False: (None, False), True: (None, False)})
        new = []
        for i, block in enumerate(self.lm.model.layers):
            block.self_attn.io = (caches[2 * i], caches[2 * i + 1], positions)
            x = block(x, inputs, None, 0)
            new += block.self_attn.out
        return (self.lm.head(x), *new)


def empty_caches(config: ModelConfig, max_seq_len: int) -> list[torch.Tensor]:
    """Zero caches in the program's input order: keys then values of each layer, (1, K, L, D)."""
    out = []
    for i in range(config.num_hidden_layers):
        shape = (1, config.kv_heads(i), max_seq_len, config.resolved_head_dim)
        out += [torch.zeros(shape), torch.zeros(shape)]
    return out


def quant_config(precision: str):
    if precision == "fp32":
        return None
    from litert_torch.generative.quantize import quant_attrs, quant_recipes

    if precision == "int8":
        return quant_recipes.full_dynamic_recipe()
    return quant_recipes.full_dynamic_recipe(weight_dtype=quant_attrs.Dtype.INT4,
                                             granularity=quant_attrs.Granularity.BLOCKWISE_32)


def tflite_bytes(model: CausalLM, max_seq_len: int, precision: str, log=print) -> bytes:
    """Convert `model` (a float model it consumes) with litert-torch; the file's bytes."""
    import litert_torch

    model = model.float().eval()
    config = model.config
    module = CacheIOLM(model).eval()
    caches = empty_caches(config, max_seq_len)
    prefill = (torch.zeros(1, PREFILL, dtype=torch.long), torch.arange(PREFILL), *caches)
    decode = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *caches)
    log(f"converting with litert-torch ({precision}; signatures prefill[{PREFILL}] and decode, "
        f"{max_seq_len}-token caches)...")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        edge = (litert_torch.signature("prefill", module, prefill).signature("decode", module, decode)
                .convert(quant_config=quant_config(precision)))
    with tempfile.TemporaryDirectory() as work:
        edge.export(str(Path(work) / "m.tflite"))
        return (Path(work) / "m.tflite").read_bytes()


def write_litert(model: CausalLM, tokenizer, out: str | Path, precision: str = "int8",
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, force: bool = False, log=print) -> Path:
    """Write `model` (a plain model; consumed) as OUT.tflite and OUT_tokenizer/, whole or not at all."""
    if precision not in LITERT_PRECISIONS:
        raise SlmError(f"LiteRT precision '{precision}' is unknown (choose from {', '.join(LITERT_PRECISIONS)})")
    check_litert_target(out, force)
    refusal = traced_refusal(model.config, max_seq_len, PREFILL + 1)
    if refusal:
        raise SlmError(f"this model cannot be written for LiteRT: {refusal}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="litert-", dir=out.parent) as work:
        side, file = Path(work) / "side", Path(work) / "model.tflite"
        write_sidecar(side, tokenizer, model.config, {"runtime": "litert", "precision": precision,
                                                      "max_seq_len": max_seq_len, "prefill": PREFILL})
        file.write_bytes(tflite_bytes(model, max_seq_len, precision, log))
        put_in_place(side, file, out)
    return out

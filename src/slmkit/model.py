"""THE model: a decoder-only transformer with Hugging Face parameter names.

Read top to bottom: norms -> attention (MHA/GQA/MQA, sliding window, static KV cache) -> gated /
plain MLP and Mixtral-style mixture of experts -> block -> model (RoPE's tables: `slmkit.rope`).
Parameter names match HF checkpoints (`model.layers.0.self_attn.q_proj.weight`,
`block_sparse_moe.experts.0.w1.weight`), so safetensors load without renaming; all renaming for
other formats (and for families whose files name or fuse things differently, such as Phi) lives in
`slmkit.interop`.

The families people bring differ in a handful of places, each a switch of `ModelConfig` read here
(which family uses which, and why, is said where the switch acts): the norm (RMSNorm, Gemma's
1 + w, Phi-2's LayerNorm), the block layout (pre-norm, Gemma's sandwich, OLMo-2's post-norm, Phi-2's
parallel branches), q/k norms, partial and per-layer RoPE, soft-capping and scale multipliers.

Blocks take explicit arguments; only `CausalLM` reads the config. This file knows nothing about
training, compression or tokenizers: compressed layers are swapped in from outside.

Shapes: B batch, T new tokens, S keys seen (cache length), C hidden size, H query heads,
K key/value heads, D head dim, R rotary dims (D, or fewer with partial rotary), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.rope import Rotary, apply_rope, rope_cos_sin, rope_inv_freq  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * w, or * (1 + w) with offset=1 (Gemma stores its norm weights around zero)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size) - offset)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 loses too much in the mean of squares). Llama scales in the input
        # dtype; Gemma scales in fp32 and rounds once at the end -- each exactly as in transformers.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    """rms (Llama and most) | rms_offset (Gemma: 1 + w) | layer (Phi-2: LayerNorm with a bias)."""
    if kind == "layer":
        return nn.LayerNorm(size, eps)
    return RMSNorm(size, eps, offset=1.0 if kind == "rms_offset" else 0.0)


# ---------------------------------------------------------------------------------------------
# Static KV cache and attention masks
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for every layer; `length` slots are filled in every row.

    Rows of a batch share slot numbers; shorter prompts are left-padded and `key_valid` marks the
    padding slots False so no query attends to them.
    """

    def __init__(self, shapes: list[tuple[int, int]], batch: int, max_len: int, dtype, device=None):
        # shapes: (K, D) per layer. Buffers: (B, K, max_len, D).
        self.keys = [torch.zeros(batch, k, max_len, d, dtype=dtype, device=device) for k, d in shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.key_valid: torch.Tensor | None = None  # (B, max_len) bool, or None when nothing is padded

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def restart(self, valid: torch.Tensor | None = None) -> None:
        """Empty the cache for new rows; valid (B, max_len) marks the real tokens of left-padded
        prompts (None: no padding)."""
        self.length, self.key_valid = 0, valid

    def rewind(self, length: int) -> None:
        """Keep the first `length` slots (a reused prompt prefix, or the accepted part of a guess)."""
        self.length = length

    def open_slot(self, count: int = 1) -> None:
        """Before a decode step: the slots it writes (one, or several for a speculative guess) hold
        real tokens in every row."""
        if self.key_valid is not None:
            self.key_valid[:, self.length:self.length + count] = True

    def empty_like(self, batch: int, max_len: int) -> KVCache:
        """A new, empty cache of this one's shapes, dtype and device."""
        shapes = [(key.shape[1], key.shape[3]) for key in self.keys]
        return KVCache(shapes, batch, max_len, self.keys[0].dtype, self.keys[0].device)

    def copy_from(self, src: KVCache, rows, start: int, src_rows, src_slots: slice) -> None:
        """Copy keys, values and validity of `src`'s rows and slots into this cache's `rows`, from
        slot `start` (a source without a validity mask is valid throughout)."""
        into = slice(start, start + src_slots.stop - (src_slots.start or 0))
        for d, s in zip(self.keys + self.values, src.keys + src.values):
            d[rows, :, into] = s[src_rows, :, src_slots]
        if self.key_valid is not None:
            self.key_valid[rows, into] = True if src.key_valid is None else src.key_valid[src_rows, src_slots]

    def repeated(self, rows: int, max_len: int) -> KVCache:
        """A cache of `rows` rows, each a copy of this one-row cache's filled slots."""
        big = self.empty_like(rows, max_len)
        big.copy_from(self, slice(None), 0, slice(None), slice(0, self.length))
        big.length = self.length
        return big


def attention_mask(
    start: int, t: int, key_valid: torch.Tensor | None, window: int | None, device=None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for T queries at slots [start, start+T) over keys [0, start+T).

    segments: (B, T) document ids of packed training rows (no cache): a token sees only earlier
    tokens of its own document. Returns no mask when SDPA's own paths are exact (one query seeing
    everything, or a causal prefill from slot 0). Otherwise a bool mask (B or 1, 1, T, S). Every
    query may always see its own slot, so a padding query never has an all-masked row (NaNs).
    """
    if key_valid is None and window is None and segments is None:
        if t == 1:
            return None, False
        if start == 0:
            return None, True
    q = torch.arange(start, start + t, device=device).unsqueeze(1)  # (T, 1)
    k = torch.arange(start + t, device=device).unsqueeze(0)  # (1, S)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    if key_valid is not None:
        allowed = allowed.unsqueeze(0) & key_valid[:, None, : start + t]  # (B, T, S)
    if segments is not None:  # packed rows start at slot 0, so queries and keys index the same tokens
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])  # (B, T, T)
    allowed = allowed | (k == q)
    return allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed[None, None], False


@dataclass
class LayerInputs:
    """What every layer's attention needs for one forward pass, made once and picked per layer:
    RoPE tables by kind ("global", "local": Gemma 3's sliding layers have their own base) and
    (mask, is_causal) by whether the layer attends through a sliding window."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[bool, tuple[torch.Tensor | None, bool]]


def softcapped_attention(q, k, v, mask, is_causal, scale: float, cap: float) -> torch.Tensor:
    """Attention with Gemma 2's soft cap on the scores, cap * tanh(scores / cap) before the mask:
    SDPA has no hook between the product and the softmax, so this is the plain computation."""
    if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves H/K query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    scores = torch.tanh(scores / cap) * cap
    if mask is None and is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention with grouped keys/values.

    qk_norm: "head" normalises each head's q and k (Qwen3, Gemma 3), "projection" the whole q and k
    projections (OLMo-2), both before RoPE. scale: None is 1/sqrt(D); Gemma 2/3 use
    query_pre_attn_scalar^-0.5, Granite its attention_multiplier. softcap: Gemma 2's score cap.
    """

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, out_bias: bool = False, dropout: float = 0.0, qk_norm: str | None = None,
                 norm: str = "rms", eps: float = 1e-6, scale: float | None = None, softcap: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, head_dim, dropout
        self.qk_norm, self.scale, self.softcap = qk_norm, scale, softcap
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=out_bias)
        if qk_norm:
            per_head = qk_norm == "head"
            self.q_norm = make_norm(norm, head_dim if per_head else n_heads * head_dim, eps)
            self.k_norm = make_norm(norm, head_dim if per_head else n_kv_heads * head_dim, eps)

    def _heads(self, x: torch.Tensor, proj: nn.Module, norm: str, n: int) -> torch.Tensor:
        """(B, T, C) -> normalised (B, n, T, D)."""
        b, t, _ = x.shape
        y = proj(x)
        if self.qk_norm == "projection":
            y = getattr(self, norm)(y)
        y = y.view(b, t, n, self.head_dim)
        if self.qk_norm == "head":
            y = getattr(self, norm)(y)
        return y.transpose(1, 2)

    def forward(self, x, cos, sin, mask, is_causal, kv=None, start=0):
        """cos/sin None: a layer without RoPE (SmolLM3's NoPE layers)."""
        b, t, _ = x.shape
        q = self._heads(x, self.q_proj, "q_norm", self.n_heads)  # (B, H, T, D)
        k = self._heads(x, self.k_proj, "k_norm", self.n_kv_heads)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write the new keys into the static cache, attend over all filled slots
            k_cache, v_cache = kv
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]  # (B, K, S, D)
            q = q.to(k.dtype)  # the cache may be kept in fp32 for bf16 weights (faster on CPUs without bf16)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, is_causal, self.scale or self.head_dim ** -0.5, self.softcap)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads, scale=self.scale,
            )  # (B, H, T, D)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------
# Feed-forward: gated (SwiGLU, GeGLU) or plain MLP, and mixture of experts
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    # the tanh approximation under its names in Gemma (gelu_pytorch_tanh) and Phi-2 (gelu_new)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise SlmError(f"hidden_act '{name}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """gated: down(act(gate(x)) * up(x)) (SwiGLU, Gemma's GeGLU); plain: down(act(up(x))) (Phi-2,
    whose fc1/fc2 are our up/down)."""

    def __init__(self, hidden_size: int, ffn_size: int, act: str = "silu", bias: bool = False, gated: bool = True):
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)
        self.act, self.gated = activation(act), gated

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Expert(nn.Module):
    """One SwiGLU expert under Mixtral's checkpoint names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden_size: int, ffn_size: int, act: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False)
        self.act = activation(act)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts (Mixtral): softmax over the k best router logits weights their outputs."""

    def __init__(self, hidden_size: int, ffn_size: int, n_experts: int, top_k: int, act: str = "silu"):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden_size, ffn_size, act) for _ in range(n_experts))

    def forward(self, x):
        b, t, c = x.shape
        x = x.reshape(-1, c)  # (N, C), N = B*T tokens
        logits = self.gate(x)  # (N, E)
        weights, chosen = torch.topk(logits.float().softmax(-1), self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # tokens routed to expert e
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(b, t, c)


# ---------------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------------

# Norm names of each block layout, in HF's names: (before attention, after attention, before the
# MLP, after the MLP); None where the layout has none. Note that HF's `post_attention_layernorm`
# feeds the MLP in Llama but normalises the attention output in Gemma 2/3 and OLMo-2.
LAYOUTS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # Llama and most
    "sandwich": ("input_layernorm", "post_attention_layernorm",  # Gemma 2/3
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo-2
    "parallel": ("input_layernorm", None, "input_layernorm", None),  # Phi-2: one norm feeds both branches
}


class Block(nn.Module):
    """Residual block: x + post(attn(pre(x))), then x + post(mlp(pre(x))), with the norms its layout
    has (see LAYOUTS); "parallel" adds both branches to the same x. Each branch output is scaled by
    `residual_multiplier` (Granite). `sliding` and `rope` ("global", "local" or None) say which mask
    and which RoPE table of the `LayerInputs` this layer uses."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden_size: int, eps: float, dropout: float = 0.0,
                 layout: str = "pre", norm: str = "rms", residual_multiplier: float = 1.0,
                 sliding: bool = False, rope: str | None = "global"):
        super().__init__()
        self.norm_names = LAYOUTS[layout]
        for name in dict.fromkeys(n for n in self.norm_names if n):
            setattr(self, name, make_norm(norm, hidden_size, eps))
        self.self_attn = attn
        # Mixtral's checkpoints call the routed feed-forward `block_sparse_moe`; dense ones `mlp`.
        self.ffn_name = "block_sparse_moe" if isinstance(mlp, SparseMoE) else "mlp"
        setattr(self, self.ffn_name, mlp)
        self.dropout = nn.Dropout(dropout)
        self.layout, self.residual_multiplier, self.sliding, self.rope = layout, residual_multiplier, sliding, rope

    @property
    def feed_forward(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def norm(self, where: int) -> nn.Module | None:
        """The norm at a place of LAYOUTS (0 attention input, 1 attention output, 2 MLP input, 3 MLP
        output), or None: compression folds scales into the norms that feed its linears."""
        name = self.norm_names[where]
        return getattr(self, name) if name else None

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Names of this block's linears grouped by the input they read, in the order they run: one
        statistic (one Hessian, one scale) serves a group."""
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        if not isinstance(self.feed_forward, MLP):  # routed experts read their own token subsets
            return (qkv, ("self_attn.o_proj",))
        gate = ("mlp.gate_proj",) if self.feed_forward.gated else ()
        if self.layout == "parallel":
            return (qkv + gate + ("mlp.up_proj",), ("self_attn.o_proj",), ("mlp.down_proj",))
        return (qkv, ("self_attn.o_proj",), gate + ("mlp.up_proj",), ("mlp.down_proj",))

    def normed(self, where: int, x: torch.Tensor) -> torch.Tensor:
        """x through the norm at `where` (x itself where the layout has none)."""
        norm = self.norm(where)
        return x if norm is None else norm(x)

    def attention_inputs(self, inputs: LayerInputs):
        """(cos, sin, mask, is_causal) of this layer from the forward pass's shared `inputs`."""
        cos, sin = inputs.rope[self.rope] if self.rope else (None, None)
        return (cos, sin, *inputs.masks[self.sliding])

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.residual_multiplier != 1.0:
            branch = branch * self.residual_multiplier
        return x + self.dropout(branch)

    def forward(self, x, inputs: LayerInputs, kv=None, start=0):
        h = self.normed(0, x)
        attn = self.self_attn(h, *self.attention_inputs(inputs), kv, start)
        if self.layout == "parallel":  # Phi-2: (attn + mlp) + x, in transformers' order
            return self.dropout(attn) + self.dropout(self.feed_forward(h)) + x
        x = self._residual(x, self.normed(1, attn))
        return self._residual(x, self.normed(3, self.feed_forward(self.normed(2, x))))


def build_block(config: ModelConfig, i: int) -> Block:
    c, hd = config, config.resolved_head_dim
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    attn = Attention(c.hidden_size, c.heads(i), c.kv_heads(i), hd, c.attention_bias, out_bias, c.attention_dropout,
                     c.qk_norm, c.norm_type, c.rms_norm_eps, c.attention_multiplier, c.attn_logit_softcapping)
    if c.num_local_experts:
        mlp = SparseMoE(c.hidden_size, c.ffn_size(i), c.num_local_experts, c.num_experts_per_tok, c.hidden_act)
    else:
        mlp = MLP(c.hidden_size, c.ffn_size(i), c.hidden_act, c.mlp_bias, c.gated_mlp)
    return Block(attn, mlp, c.hidden_size, c.rms_norm_eps, c.hidden_dropout, c.block_layout, c.norm_type,
                 c.residual_multiplier, c.is_sliding(i), c.rope_kind(i))


class Backbone(nn.Module):
    """HF's `model.*`: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.num_blocks))
        self.norm = make_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.rotary = nn.ModuleDict(self._rotaries())
        self.tie_weights()

    def _rotaries(self) -> dict[str, Rotary]:
        """The RoPE tables the layers use: "global", and "local" for Gemma 3's sliding layers."""
        c = self.config
        dim = int(c.resolved_head_dim * c.partial_rotary_factor)
        tables = {"global": Rotary(dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)}
        if c.rope_local_base_freq is not None:
            tables["local"] = Rotary(dim, c.rope_local_base_freq, None, c.max_position_embeddings)
        return tables

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (call after loading). A
        quantized pair shares its codes instead: the embedding is then a lookup into the head's."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype (the final norm's: the embedding may be a quantized lookup)."""
        return self.model.norm.weight.dtype

    def reset_rope(self) -> None:
        """Recompute the RoPE tables (after building on the `meta` device and loading weights)."""
        self.rotary = nn.ModuleDict(self._rotaries()).to(self.model.norm.weight.device)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: N(0, initializer_range), zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, self.config.initializer_range, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.constant_(module.weight, 1.0 - getattr(module, "offset", 0.0))
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def kv_shapes(self) -> list[tuple[int, int]]:
        """(K, D) of every applied layer, in order (shared blocks get one entry per application)."""
        reps, layers = self.config.block_repeats, self.model.layers
        return [(layers[i // reps].self_attn.n_kv_heads, layers[i // reps].self_attn.head_dim)
                for i in range(self.config.num_hidden_layers)]

    def new_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache(self.kv_shapes(), batch, max_len, dtype or self.dtype, self.model.norm.weight.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, C); Gemma scales by sqrt(C) and Granite by its embedding_multiplier."""
        x = self.model.embed_tokens(input_ids).to(self.dtype)  # a no-op but for a quantized lookup (fp32 rows)
        m = self.config.embedding_multiplier
        return x if m == 1.0 else x * torch.tensor(m, dtype=x.dtype)  # rounded to x's dtype, as HF does

    def layer_inputs(self, positions: torch.Tensor, start: int, t: int, key_valid: torch.Tensor | None,
                     dtype: torch.dtype, segments: torch.Tensor | None = None) -> LayerInputs:
        """RoPE tables and masks for T tokens at `positions` (B, T), from cache slot `start`."""
        rope = {kind: table(positions, dtype) for kind, table in self.rotary.items()}
        windows = {block.sliding for block in self.model.layers}
        masks = {sliding: attention_mask(start, t, key_valid, self.config.sliding_window if sliding else None,
                                         positions.device, segments) for sliding in windows}
        return LayerInputs(rope, masks)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: (..., C) -> (..., V), with Granite's logit divisor and Gemma 2's
        final soft cap."""
        logits = self.lm_head(self.model.norm(x))
        c = self.config
        if c.logits_scaling != 1.0:
            logits = logits / c.logits_scaling
        if c.final_logit_softcapping is not None:
            logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        return logits

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids` (B, T). With `cache`, the tokens continue it and are appended.

        positions: (B, T) RoPE positions; by default the slot numbers (right for unpadded rows).
        logits_to_keep: compute logits only for the last N positions (0 = all), as in HF; or a
            (B, T) bool mask of the positions to keep, which returns (N, V) for the N kept ones
            (fine-tuning scores only the answer tokens, and the head is a fifth of a small model).
        segment_ids: (B, T) document ids of packed rows (training only): documents do not see
            each other; pass `positions` that restart at 0 for each document.
        """
        x = self.trunk(input_ids, cache, positions, segment_ids)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[logits_to_keep]  # (N, C)
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.head(x)  # (B, T, V), or (N, V) for a mask

    def final_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, C): the last block's output after the final norm (Hugging Face's
        `last_hidden_state`), what embeddings pool."""
        return self.model.norm(self.trunk(input_ids, None, positions, None))

    def trunk(self, input_ids: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
              segment_ids: torch.Tensor | None) -> torch.Tensor:
        """The embedding and every block: (B, T) -> (B, T, C), before the final norm."""
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise SlmError(f"KV cache holds {cache.max_len} tokens; cannot add {t} after {start}")
        if segment_ids is not None and cache is not None:
            raise SlmError("packed documents (segment_ids) are for training without a KV cache")
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.dropout(self.embed(input_ids))  # (B, T, C)
        key_valid = cache.key_valid if cache is not None else None
        inputs = self.layer_inputs(positions, start, t, key_valid, x.dtype, segment_ids)
        reps = self.config.block_repeats
        for i in range(self.config.num_hidden_layers):
            kv = cache.layer(i) if cache is not None else None
            x = self.model.layers[i // reps](x, inputs, kv, start)
        if cache is not None:
            cache.length = start + t
        return x

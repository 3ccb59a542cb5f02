"""THE model: a decoder-only transformer with Hugging Face parameter names.

Read top to bottom: RMSNorm -> RoPE -> attention (MHA/GQA/MQA, sliding window, static KV cache)
-> SwiGLU MLP and Mixtral-style mixture of experts -> block -> model. Parameter names match HF
checkpoints (`model.layers.0.self_attn.q_proj.weight`, `block_sparse_moe.experts.0.w1.weight`), so
safetensors load without renaming; all renaming for other formats lives in `slmkit.interop`.

Blocks take explicit arguments; only `CausalLM` reads the config. This file knows nothing about
training, compression or tokenizers: compressed layers are swapped in from outside.

Shapes: B batch, T new tokens, S keys seen (cache length), C hidden size, H query heads,
K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError

# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 loses too much in the mean of squares), scale in the input dtype,
        # exactly as HF's LlamaRMSNorm.
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half layout, as HF stores q/k rows)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,), with optional `linear` or Llama-3 style scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise SlmError(f"rope_scaling type '{kind}' is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1+: long wavelengths are slowed by `factor`, short ones kept, the middle blended."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin, (B, 1, T, D), for integer positions (B, T); computed in fp32.

    The sin's first half is negated so that rotate_half(x) * sin == roll(x, D/2) * signed_sin,
    which `apply_rope` uses: one roll instead of two slices, a negation and a concatenation.
    """
    freqs = positions.unsqueeze(-1).float() * inv_freq  # (B, T, D/2)
    sin = freqs.sin()
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).unsqueeze(1)  # (B, 1, T, D)
    signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
    return cos.to(dtype), signed_sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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

    def open_slot(self) -> None:
        """Before a decode step: the slot it writes holds a real token in every row."""
        if self.key_valid is not None:
            self.key_valid[:, self.length] = True

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


class Attention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, out_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, head_dim, dropout
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=out_bias)

    def forward(self, x, cos, sin, mask, is_causal, kv=None, start=0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write the new keys into the static cache, attend over all filled slots
            k_cache, v_cache = kv
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]  # (B, K, S, D)
            q = q.to(k.dtype)  # the cache may be kept in fp32 for bf16 weights (faster on CPUs without bf16)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU MLP and mixture of experts
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise SlmError(f"hidden_act '{name}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden_size: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        # Mixtral's checkpoints call the routed feed-forward `block_sparse_moe`; dense ones `mlp`.
        self.ffn_name = "block_sparse_moe" if isinstance(mlp, SparseMoE) else "mlp"
        setattr(self, self.ffn_name, mlp)
        self.dropout = nn.Dropout(dropout)

    @property
    def feed_forward(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def forward(self, x, cos, sin, mask, is_causal, kv=None, start=0):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv, start))
        return x + self.dropout(self.feed_forward(self.post_attention_layernorm(x)))


def build_block(config: ModelConfig, i: int) -> Block:
    c, hd = config, config.resolved_head_dim
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    attn = Attention(c.hidden_size, c.heads(i), c.kv_heads(i), hd, c.attention_bias, out_bias, c.attention_dropout)
    if c.num_local_experts:
        mlp = SparseMoE(c.hidden_size, c.ffn_size(i), c.num_local_experts, c.num_experts_per_tok, c.hidden_act)
    else:
        mlp = MLP(c.hidden_size, c.ffn_size(i), c.hidden_act, c.mlp_bias)
    return Block(attn, mlp, c.hidden_size, c.rms_norm_eps, c.hidden_dropout)


class Backbone(nn.Module):
    """HF's `model.*`: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.num_blocks))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.tie_weights()

    def _inv_freq(self, device=None) -> torch.Tensor:
        c = self.config
        return rope_inv_freq(c.resolved_head_dim, c.rope_theta, c.rope_scaling).to(device)

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute the RoPE table (after building on the `meta` device and loading weights)."""
        self.inv_freq = self._inv_freq(self.model.embed_tokens.weight.device)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: N(0, initializer_range), zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, self.config.initializer_range, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def kv_shapes(self) -> list[tuple[int, int]]:
        """(K, D) of every applied layer, in order (shared blocks get one entry per application)."""
        reps, layers = self.config.block_repeats, self.model.layers
        return [(layers[i // reps].self_attn.n_kv_heads, layers[i // reps].self_attn.head_dim)
                for i in range(self.config.num_hidden_layers)]

    def new_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.kv_shapes(), batch, max_len, dtype or weight.dtype, weight.device)

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
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise SlmError(f"KV cache holds {cache.max_len} tokens; cannot add {t} after {start}")
        if segment_ids is not None and cache is not None:
            raise SlmError("packed documents (segment_ids) are for training without a KV cache")
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.dropout(self.model.embed_tokens(input_ids))  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        key_valid = cache.key_valid if cache is not None else None
        mask, is_causal = attention_mask(start, t, key_valid, self.config.sliding_window, x.device, segment_ids)
        reps = self.config.block_repeats
        for i in range(self.config.num_hidden_layers):
            kv = cache.layer(i) if cache is not None else None
            x = self.model.layers[i // reps](x, cos, sin, mask, is_causal, kv, start)
        if cache is not None:
            cache.length = start + t
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[logits_to_keep]  # (N, C)
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))  # (B, T, V), or (N, V) for a mask

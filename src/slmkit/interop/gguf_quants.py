"""Quantized GGUF exports: q8_0, q4_0, q4_1 and llama.cpp's q4_k_m mix.

The legacy 32-value block types come from the `gguf` package's quantizers. It has no quantizer
for the k-quants (its Q4_K/Q6_K only dequantize), so `q4_k_block`/`q6_k_block` here write them,
byte for byte in ggml's `block_q4_K`/`block_q6_K` layout, with the reference's min/max grid (no
rmse search, so slightly less accurate than llama-quantize). Tests check them by reading them back
through `gguf.quants.dequantize`.

q4_k_m follows llama.cpp's `llama_tensor_get_type`: Q4_K everywhere, Q6_K for the output head (or
the tied embedding) and for attn_v/ffn_down in the layers `use_more_bits` picks; a tensor whose rows
are not a multiple of 256 falls back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0). q4_0 and q4_1
keep the head at Q6_K (Q8_0 for such rows) the same way, as llama-quantize does.

An slmkit-quantized model is not rounded a second time where a block type can hold its grid
(`Grid`, `encode_on_grid`): int8's per-row scales are Q8_0 blocks' scales, and asymmetric int4
groups of any multiple of 32 are Q4_1 blocks (d = scale, m = -scale * zero: a group of 64 is two
blocks with the same d and m); symmetric int4 (every zero 8) is Q4_0. Only d and m round, to fp16.
Other pairs are rounded again, and the exporter says by how much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from slmkit.errors import SlmError
from slmkit.runtime import GGUF_TYPES

QK_K = 256
QK = 32  # values per block of the legacy types (Q8_0, Q4_0, Q4_1)
# llama.cpp's LLAMA_FTYPE value of each type slmkit writes (runtime.GGUF_TYPES, in that order)
FTYPES = dict(zip(GGUF_TYPES, (0, 1, 7, 2, 3, 15)))
BITS = dict(zip(GGUF_TYPES, (32, 16, 8.5, 4.5, 5.0, 4.8)))  # bits per weight, scales included (estimates)
BLOCK_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def check_shapes(tensors: list[tuple[str, tuple[int, ...]]], file_type: str) -> None:
    """Refuse before writing anything when a matrix's rows do not split into the type's blocks."""
    if file_type in ("f32", "f16"):
        return
    for name, shape in tensors:
        if len(shape) >= 2 and shape[-1] % 32:
            raise SlmError(f"tensor {name} has rows of {shape[-1]} values, not a multiple of the 32-value blocks of "
                           f"{file_type}; export it as f16 or f32")


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, n_layers: int, has_output: bool) -> str:
    """The GGML type name for one tensor of a `file_type` export."""
    if len(shape) < 2:
        return "F32"  # norms stay exact, as in llama.cpp
    head = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    if file_type in BLOCK_TYPES and not (head and file_type != "q8_0"):
        return BLOCK_TYPES[file_type]
    kind = "Q4_K"
    layer = re.match(r"blk\.(\d+)\.", name)
    if head:  # as llama.cpp: 6 bits for the output head (or the embedding tied to it) in every 4-bit mix
        kind = "Q6_K"
    elif layer and name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(int(layer[1]), n_layers):
        kind = "Q6_K"
    return K_FALLBACK[kind] if shape[-1] % QK_K else kind


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get 6 bits in the _M mixes: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def encode(data: np.ndarray, kind: str) -> np.ndarray:
    """fp32 (..., K) -> the raw bytes of GGML type `kind`, (..., bytes per row) uint8 (or the float array)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind == "F32":
        return data.astype(np.float32)
    if kind == "F16":
        return data.astype(np.float16)
    if kind == "Q4_K":
        return _rows(data, q4_k_block)
    if kind == "Q6_K":
        return _rows(data, q6_k_block)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def _rows(data: np.ndarray, block_fn) -> np.ndarray:
    """Apply a (blocks, 256) -> (blocks, bytes) quantizer to every row of `data`."""
    shape = data.shape
    blocks = data.astype(np.float32).reshape(-1, QK_K)
    out = block_fn(blocks)
    return out.reshape(*shape[:-1], (shape[-1] // QK_K) * out.shape[-1])


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)  # ggml's nearest_int rounds halves up for the values it sees


def q4_k_block(x: np.ndarray) -> np.ndarray:
    """(B, 256) fp32 -> (B, 144) bytes: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of codes."""
    b = x.shape[0]
    sub = x.reshape(b, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # (B, 8) the reference keeps 0 inside every range
    hi = sub.max(axis=-1)
    scales = (hi - lo) / 15.0
    mins = -lo
    max_scale, max_min = scales.max(axis=-1, keepdims=True), mins.max(axis=-1, keepdims=True)
    inv_scale = np.where(max_scale > 0, 63.0 / np.maximum(max_scale, 1e-30), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.maximum(max_min, 1e-30), 0.0)
    ls = np.minimum(63, _round(inv_scale * scales)).astype(np.uint8)
    lm = np.minimum(63, _round(inv_min * mins)).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    step = d.astype(np.float32) * ls  # (B, 8) the scales the decoder will use
    offset = dmin.astype(np.float32) * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step[..., None] > 0, _round((sub + offset[..., None]) / step[..., None]), 0)
    codes = np.clip(codes, 0, 15).astype(np.uint8).reshape(b, 4, 2, 32)  # pairs of sub-blocks per 64 values
    qs = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(b, 128)
    packed = np.zeros((b, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=-1)


def q6_k_block(x: np.ndarray) -> np.ndarray:
    """(B, 256) fp32 -> (B, 210) bytes: 128 low nibbles, 64 bytes of high bits, 16 int8 scales, d (fp16)."""
    b = x.shape[0]
    sub = x.reshape(b, 16, 16)
    amax = np.abs(sub).max(axis=-1)  # (B, 16)
    scales = amax / 31.0
    max_scale = scales.max(axis=-1, keepdims=True)
    iscale = np.where(max_scale > 0, 127.0 / np.maximum(max_scale, 1e-30), 0.0)
    sc = np.minimum(127, _round(iscale * scales)).astype(np.int8)
    d = (max_scale / 127.0).astype(np.float16)
    step = d.astype(np.float32) * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, _round(sub / step[..., None]), 0)
    codes = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(b, 2, 4, 32)  # two halves of 128 values
    low, high = codes & 0xF, codes >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(b, 128), qh.reshape(b, 64), sc.view(np.uint8), d.view(np.uint8)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Writing a quantized model's own grid
# ---------------------------------------------------------------------------------------------


@dataclass
class Grid:
    """The grid a quantized linear's weights lie on: w = d * q + m for each group of `group` input
    columns, d and m (N, G) (m None: symmetric int8 codes, G = 1). Row-wise like the weight, so the
    exporter's row permutations, concatenations and scalings apply to d and m unchanged."""

    d: torch.Tensor
    m: torch.Tensor | None
    group: int
    bits: int

    def rows(self, transform) -> Grid:
        """The grid of `transform(weight)` for a transform that acts on rows (and scales)."""
        return Grid(transform(self.d), None if self.m is None else transform(self.m), self.group, self.bits)


def encode_on_grid(data: np.ndarray, kind: str, grid: Grid) -> np.ndarray | None:
    """(N, K) fp32 weights on `grid` -> the raw (N, bytes) of GGML type `kind` holding exactly those
    codes, or None when `kind`'s blocks cannot hold the grid (the caller rounds again)."""
    if data.ndim != 2 or grid.group % QK or data.shape[1] % QK:
        return None
    blocks = data.shape[1] // QK  # a zero-padded last group covers fewer blocks than the others
    per_block = lambda t: np.repeat(t.float().numpy(), grid.group // QK, axis=1)[:, :blocks]  # noqa: E731
    d = per_block(grid.d).astype(np.float16)
    m = None if grid.m is None else per_block(grid.m).astype(np.float16)
    if kind == "Q8_0" and grid.bits == 8 and m is None:
        q = _codes(data, d, np.zeros_like(d), -127, 127).astype(np.int8)
        return _blocks([d], q.view(np.uint8))
    if kind == "Q4_1" and grid.bits == 4 and m is not None:
        return _blocks([d, m], _nibbles(_codes(data, d, m, 0, 15)))
    symmetric = m is not None and np.array_equal(m.astype(np.float32), -8 * d.astype(np.float32))
    if kind == "Q4_0" and grid.bits == 4 and symmetric:
        return _blocks([d], _nibbles(_codes(data, d, m, 0, 15)))
    return None


def _codes(data: np.ndarray, d: np.ndarray, m: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(N, K) codes q with data = d * q + m per block (d, m (N, K/32)); a block of d = 0 gets 0."""
    n, k = data.shape
    blocks = data.reshape(n, k // QK, QK)
    d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d32 != 0, np.rint((blocks - m32) / d32), 0)
    return np.clip(q, lo, hi).reshape(n, k)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(N, K) codes in [0, 15] -> ggml's (N, K/32, 16) bytes: value j low, value j + 16 high."""
    n, k = q.shape
    blocks = q.astype(np.uint8).reshape(n, k // QK, 2, QK // 2)
    return blocks[:, :, 0] | (blocks[:, :, 1] << 4)


def _blocks(halves: list[np.ndarray], payload: np.ndarray) -> np.ndarray:
    """Per block: the fp16 fields (each (N, B)) then the payload bytes -> (N, B * block bytes)."""
    n, b = halves[0].shape
    fields = [h.reshape(n, b, 1).view(np.uint8) for h in halves]
    return np.concatenate([*fields, payload.reshape(n, b, -1)], axis=-1).reshape(n, -1)

"""Weight-only quantized linears that run on PyTorch's packed CPU kernels.

`Int8Linear`: one int8 code per weight and one fp32 scale per output row, multiplied by
`aten._weight_int8pack_mm` (int8 weights are read straight into the dot products). Activations
enter both kernels in bf16 (see `_kernel_input`); outputs come back in the caller's dtype.
`Int4Linear`: asymmetric 4-bit codes in groups of `group_size` input columns, each group with a
scale and an integer zero point: w = (q - zero) * scale. At load the codes are repacked into the
layout of `aten._weight_int4pack_mm_for_cpu`, whose formula is w = (q - 8) * scale + offset, so
offset = (8 - zero) * scale. Neither module dequantizes the whole matrix on the hot path.

Checkpoint layout (what `state_dict` holds, independent of the kernel's private packing):
    int8: qweight int8 (N, K), scales fp32 (N,)
    int4: qweight uint8 (N, Kp/2) two codes per byte (low nibble = even column), scales fp32
          (N, G), zeros uint8 (N, G); Kp = K rounded up to the group size (padding columns
          multiply zero activations), G = Kp / group_size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

INT4_INNER_K_TILES = 2  # the CPU kernel accepts 2, 4 or 8; it only changes its internal layout
KERNEL_ROWS = 16  # the int4 kernel packs output rows in blocks of 16
PACK_CHUNK_ROWS = 1024  # rows converted to the int4 packing at a time (a multiple of KERNEL_ROWS)
PAD_BUFFER_ROWS = 8  # inputs of up to this many rows (decoding) reuse a padded buffer per layer


class QuantLinear(nn.Module):
    """Shared bookkeeping: shapes, an optional float bias, scales cached per activation dtype."""

    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._cast: dict = {}  # dtype -> scales in that dtype; ("pad", rows) -> padded input buffer

    def _cached(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == tensor.dtype:
            return tensor
        if dtype not in self._cast:
            self._cast[dtype] = tensor.to(dtype)
        return self._cast[dtype]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "scales" in state_dict:  # a checkpoint loaded "in bf16" still gets exact scales
            state_dict[prefix + "scales"] = state_dict[prefix + "scales"].float()
        if prefix + "qweight" in state_dict:
            state_dict[prefix + "qweight"] = aligned(state_dict[prefix + "qweight"])
        self._cast.clear()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # an adapter above trains: gradients flow to x
            return FrozenProduct.apply(x, self)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, cache: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Weight rows `index` (...) as fp32 (..., K): the lookup of a tied embedding (`tied.py`)."""
        raise NotImplementedError

    def keep_rows(self) -> None:
        """Make `rows` cheap from now on (a tied embedding reads a few rows per token)."""

    def _finish(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when its data does not start on a 64-byte boundary. safetensors hands out
    tensors at whatever offset they have in the file, and the int8 kernel's vector loads
    crash (SIGSEGV, measured with torch 2.13) on codes that are not aligned; PyTorch's own
    allocations always are."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


class Int8Linear(QuantLinear):
    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_codes(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        module = cls(qweight.shape[1], qweight.shape[0], bias is not None)
        module.qweight.copy_(qweight)
        module.scales.copy_(scales)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    def dequantized(self, cache: bool = False) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.qweight[index].float() * self.scales[index].unsqueeze(-1)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _kernel_input(x.reshape(-1, self.in_features))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self._cached(self.scales, x2.dtype))
        return self._finish(y.to(x.dtype), shape)


class Int4Linear(QuantLinear):
    """4-bit group-wise weights; the packed kernel tensors live in non-persistent buffers."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.padded_in = -(-in_features // group_size) * group_size
        self.padded_out = -(-out_features // KERNEL_ROWS) * KERNEL_ROWS
        groups = self.padded_in // group_size
        # kernel layout, filled by `set_codes` / loading: (Np, Kp/2) uint8 and (G, Np, 2) scale+offset
        self.register_buffer("packed", torch.zeros(self.padded_out, self.padded_in // 2, dtype=torch.uint8),
                             persistent=False)
        self.register_buffer("scale_offset", torch.zeros(groups, self.padded_out, 2), persistent=False)
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.shared_kernel = None  # a `fused.SharedInputKernel` shared with sibling linears, if fused
        self.plain_codes = False  # keep nibble-packed codes beside the kernel's packing (see `keep_rows`)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   in_features: int, bias: torch.Tensor | None = None, rows: bool = False):
        """codes: (N, Kp) integers in [0, 15]; scales/zeros: (N, G); rows: see `keep_rows`."""
        module = cls(in_features, codes.shape[0], group_size, bias is not None)
        if rows:
            module.keep_rows()
        module.set_codes(codes, scales, zeros)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        if self.shared_kernel is not None:
            self.shared_kernel.dissolve()
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        extra = self.padded_out - self.out_features  # the kernel wants rows in multiples of 16; extras are cut off
        self.packed = pack_int4(F.pad(codes.to(torch.uint8), (0, 0, 0, extra)) if extra else codes)
        scales, offset = F.pad(self.scales, (0, 0, 0, extra)), F.pad((8 - self.zeros.float()) * self.scales,
                                                                      (0, 0, 0, extra))  # (Np, G)
        self.scale_offset = torch.stack([scales.t(), offset.t()], dim=-1).contiguous()  # (G, Np, 2)
        self._cast.clear()
        if self.plain_codes:
            self._cast["plain"] = codes[:, 0::2].to(torch.uint8) | (codes[:, 1::2].to(torch.uint8) << 4)

    def keep_rows(self) -> None:
        """From the next `set_codes` (or load) on, keep the codes nibble-packed in row order too
        (half a byte per weight: 14 MB for SmolLM2's head), so a row is a slice, not a probe of the
        kernel's private packing."""
        self.plain_codes = True

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        if "plain" not in self._cast:  # codes set before keep_rows: recover them once
            self.codes(cache=True)
        plain = self._cast["plain"][index]  # (..., Kp/2)
        codes = torch.stack([plain & 15, plain >> 4], dim=-1).reshape(*index.shape, -1, self.group_size)
        w = (codes.float() - self.zeros[index].float()[..., None]) * self.scales[index][..., None]
        return w.reshape(*index.shape, self.padded_in)[..., : self.in_features]

    def codes(self, cache: bool = False) -> torch.Tensor:
        """The (N, Kp) codes, recovered from the kernel's packing (see `kernel_layout`).

        cache: keep them as plain nibbles too (half a byte per weight): the backward pass of a
        QLoRA step dequantizes every layer once per step, and the layout probe is meant for saving."""
        if "plain" in self._cast:
            plain = self._cast["plain"]
            return torch.stack([plain & 15, plain >> 4], dim=-1).reshape(self.out_features, self.padded_in)
        codes = self._probed_codes()
        if cache:
            self._cast["plain"] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return codes

    def _probed_codes(self) -> torch.Tensor:
        source = kernel_layout(self.padded_out, self.padded_in)
        nibbles = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(-1)
        codes = torch.empty(self.padded_out * self.padded_in, dtype=torch.uint8)
        codes[source] = nibbles
        return codes.reshape(self.padded_out, self.padded_in)[: self.out_features]

    def dequantized(self, cache: bool = False) -> torch.Tensor:
        """(N, K) float weights: the exact values the kernel multiplies by (cache: see `codes`)."""
        g = self.group_size
        codes = self.codes(cache).float().reshape(self.out_features, -1, g)
        w = (codes - self.zeros.float()[..., None]) * self.scales[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_kernel is not None:
            return self._finish(self.shared_kernel.output(self, x), x.shape)
        x2 = self.kernel_input(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                       self._cached(self.scale_offset, x2.dtype))
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return self._finish(y.to(x.dtype), x.shape)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) as the kernel's (M, Kp) bf16 operand."""
        x2 = x.reshape(-1, self.in_features)
        return _kernel_input(x2) if self.padded_in == self.in_features else self._padded(x2)

    def _padded(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) cast into zero-padded (M, Kp) bf16, in one copy: a reused buffer for decode-sized M."""
        rows = x2.shape[0]
        # under torch.compile a plain pad fuses into the cast, and filling the buffer cache would
        # change the state the compiled graph was guarded on (forcing a second compilation)
        if rows > PAD_BUFFER_ROWS or torch.compiler.is_compiling():
            return F.pad(x2.to(KERNEL_DTYPE), (0, self.padded_in - self.in_features)).contiguous()
        key = ("pad", rows)
        if key not in self._cast:
            self._cast[key] = torch.zeros(rows, self.padded_in, dtype=KERNEL_DTYPE)
        buffer = self._cast[key]
        buffer[:, : self.in_features].copy_(x2)
        return buffer

    # The checkpoint holds plain nibble-packed codes; the kernel packing is rebuilt on load.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        codes = self.codes()
        destination[prefix + "qweight"] = codes[:, 0::2] | (codes[:, 1::2] << 4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qweight = state_dict.pop(prefix + "qweight", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if qweight is None:
            missing_keys.append(prefix + "qweight")
            return
        if tuple(qweight.shape) != (self.out_features, self.padded_in // 2):
            error_msgs.append(f"{prefix}qweight has shape {tuple(qweight.shape)}, expected "
                              f"{(self.out_features, self.padded_in // 2)}")
            return
        codes = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(self.out_features, self.padded_in)
        self.set_codes(codes, self.scales, self.zeros)


KERNEL_DTYPE = torch.bfloat16


class FrozenProduct(torch.autograd.Function):
    """y = x W^T + b on a quantized kernel, with W frozen: the backward pass gives only
    dL/dx = dL/dy W, from W dequantized for that layer alone (QLoRA trains adapters over a packed
    base without an fp32 copy of the whole model). The packed kernels have no autograd formula."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module, ctx.shape = module, x.shape
        return module._product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantized(cache=True)  # (N, K) fp32, freed after this layer
        grad_x = grad.reshape(-1, weight.shape[0]).float() @ weight
        return grad_x.reshape(ctx.shape).to(grad.dtype), None


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, module) of every quantized linear in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def weight_count(model: nn.Module) -> int:
    """Parameters of `model` with each quantized linear's weights counted as the float weights they
    stand for (its packed codes are buffers, not parameters)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for _, m in quantized_modules(model))


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Activations in bf16: both kernels have vectorized bf16 paths, while their fp32 paths are
    scalar loops on CPUs without AVX-512 (measured ~10x slower than an fp32 GEMV on AMD Zen 3).
    Weights are already 8 or 4 bits, so bf16 activations cost little accuracy (see bench/quantize.py)."""
    return x.to(KERNEL_DTYPE).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(Np, Kp) codes in [0, 15], any integer dtype -> the int4 kernel's (Np, Kp/2) packing.

    The op takes int32 codes, 8x the size of its packing: for SmolLM2's 49152x576 output head
    that copy alone is 113 MB, the peak of loading a 74 MB int4 checkpoint. Rows are converted a
    block at a time where stacking the blocks' packings gives the packing of the whole (probed)."""
    rows, cols = codes.shape
    tail = rows % PACK_CHUNK_ROWS or PACK_CHUNK_ROWS
    if rows <= PACK_CHUNK_ROWS or not packing_stacks((PACK_CHUNK_ROWS, tail), cols):
        return _pack_block(codes)
    return torch.cat([_pack_block(block) for block in codes.split(PACK_CHUNK_ROWS)])


def _pack_block(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(),
                                                              INT4_INNER_K_TILES)


@functools.lru_cache(maxsize=16)
def packing_stacks(rows: tuple[int, ...], k: int) -> bool:
    """Whether the kernel's private packing of matrices stacked by rows is their packings stacked
    (it packs rows in blocks, so it is when each height is a multiple of the block); probed once
    per shape with random codes rather than assumed."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g) for n in rows]
    return torch.equal(_pack_block(torch.cat(parts)), torch.cat([_pack_block(p) for p in parts]))


@functools.lru_cache(maxsize=4)  # a model's linears come in a handful of shapes; saving probes each once
def kernel_layout(n: int, k: int) -> torch.Tensor:
    """For each nibble of the kernel's (n, k/2) packing (low then high), the flat index n*k + col it holds.

    Why probe instead of hard-coding: the CPU kernel's tile layout is private to PyTorch and may
    change between releases. Packing matrices whose codes spell out their own index, 4 bits at a
    time, recovers it from the op itself; it is only needed when saving, never per token.
    """
    index = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(int(n * k - 1).bit_length(), 1), 4):
        digits = ((index >> shift) & 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, INT4_INNER_K_TILES)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64)
        source |= nibbles << shift
    return source

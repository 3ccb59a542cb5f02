"""Round-to-nearest quantization math shared by RTN, GPTQ and AWQ (all in fp32, on (N, K) weights).

int8: symmetric per output row, codes in [-127, 127], w ~= q * scale.
int4: asymmetric per group of `group_size` input columns, codes in [0, 15], w ~= (q - zero) * scale,
      with min/max ranges (a group of equal values gets a tiny scale, never zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_MAX = 15


@dataclass
class Int4Codes:
    codes: torch.Tensor  # (N, Kp) uint8 in [0, 15]
    scales: torch.Tensor  # (N, G) fp32
    zeros: torch.Tensor  # (N, G) uint8 in [0, 15]
    group_size: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32."""
        n = self.codes.shape[0]
        q = self.codes.float().reshape(n, -1, self.group_size)
        w = (q - self.zeros.float()[..., None]) * self.scales[..., None]
        return w.reshape(n, -1)[:, : self.in_features]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 codes (N, K) and fp32 scales (N,)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


FP16_TINY = 2.0**-14  # fp16's smallest normal number


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero columns up to a multiple of the group size (they meet zero activations in the kernel)."""
    extra = -w.shape[1] % group_size
    return F.pad(w, (0, extra)) if extra else w


def int4_grid(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group: groups (..., g) -> scales (...), zeros (...) as floats.

    Scales are fp16 values (held in fp32): a checkpoint stores them in 2 bytes, and GGUF's Q4_1/Q4_0
    blocks hold them exactly, as llama.cpp's own fp16 block scales (a relative change of at most
    2^-11, far below the rounding of the codes). The smallest is fp16's smallest normal number."""
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / INT4_MAX).clamp(min=FP16_TINY).half().float()
    zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    return scales, zeros


def int4_round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes of `w` on a grid; scales/zeros broadcast against w."""
    return torch.clamp(torch.round(w / scales) + zeros, 0, INT4_MAX)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Codes:
    """Group-wise round-to-nearest of an (N, K) weight."""
    n, k = w.shape
    groups = pad_columns(w.float(), group_size).reshape(n, -1, group_size)
    scales, zeros = int4_grid(groups)
    codes = int4_round(groups, scales[..., None], zeros[..., None])
    return Int4Codes(codes.reshape(n, -1).to(torch.uint8), scales, zeros.to(torch.uint8), group_size, k)


def fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` after an int4 round trip (for searches that score a candidate by its output error)."""
    return quantize_int4(w, group_size).dequantize()

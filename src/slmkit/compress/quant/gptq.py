"""GPTQ (Frantar et al., 2022): quantize one column at a time and push its rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a linear y = x W^T with calibration inputs X (tokens, K), the Hessian is H = 2 X^T X / tokens.
We follow the reference algorithm (lazy batch updates in blocks of 128 columns, Cholesky form of
H^-1, dampening by `damp` x mean(diag H), dead inputs zeroed). With `act_order` columns are visited
by decreasing diag(H); group scales then come from the original column groups ("static groups"),
so the result keeps contiguous groups that the packed int4 kernel can run.
"""

from __future__ import annotations

import torch

from slmkit.compress.quant.rtn import Int4Codes, int4_grid, int4_round, pad_columns

BLOCK = 128


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01,
              act_order: bool = False) -> Int4Codes:
    """Quantize an (N, K) weight given its (K, K) Hessian; returns codes in the original column order."""
    n, k = weight.shape
    w = pad_columns(weight.float().clone(), group_size)  # (N, Kp)
    kp = w.shape[1]
    h = torch.zeros(kp, kp)
    h[:k, :k] = hessian
    dead = torch.diag(h) == 0  # inputs that were always zero (and the padding) carry no error
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # static groups: each group's grid from the original weights, before any error compensation
    scales, zeros = int4_grid(w.reshape(n, -1, group_size))  # (N, G)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(kp)
    w, h = w[:, order], h[order][:, order]
    hinv = inverse_hessian_cholesky(h, damp)
    codes = torch.zeros(n, kp)
    group_of = order // group_size  # (Kp,) the group each visited column belongs to
    for start in range(0, kp, BLOCK):
        end = min(start + BLOCK, kp)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col, d = block[:, i], hinv[start + i, start + i]
            g = group_of[start + i]
            q = int4_round(col, scales[:, g], zeros[:, g])
            codes[:, start + i] = q
            err = (col - (q - zeros[:, g]) * scales[:, g]) / d
            block[:, i:] -= err[:, None] * hinv[start + i, start + i : end][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(order)]  # back to the original column order
    return Int4Codes(codes.to(torch.uint8), scales, zeros.to(torch.uint8), group_size, k)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, computed in float64."""
    h = h.double()
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()

"""SparseGPT (Frantar & Alistarh, 2023): prune a linear's weights to a sparsity, choosing which to
drop by their OBS saliency w^2 / [H^-1]_jj^2 and moving each dropped weight's error onto the columns
not yet visited, weighted by the inverse Hessian of the layer's squared output error.

Follows the reference (IST-DASLab/sparsegpt): Cholesky form of H^-1 with dampening, lazy updates in
blocks of 128 columns, the mask chosen per block from the error-updated weights ("adaptive mask
selection"), N:M groups chosen when the column sweep reaches them. One difference: the reference
picks a block's mask over the whole block (so rows end up with different sparsities); we pick it per
row, with each block's share of the row's quota, so every row has exactly the requested sparsity.
"""

from __future__ import annotations

import torch

from slmkit.compress.quant.gptq import BLOCK, inverse_hessian_cholesky


def row_quota(columns: int, sparsity: float) -> int:
    """Weights pruned in each row: as in the Wanda reference, int(columns x sparsity)."""
    return int(columns * sparsity)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.0,
                    nm: tuple[int, int] | None = None, damp: float = 0.01) -> torch.Tensor:
    """The pruned (N, K) weight (zeros are the mask) given the (K, K) Hessian 2 X^T X / rows.

    Either `sparsity` (each row loses int(K x sparsity) weights) or `nm` = (n, m): n of every m
    consecutive weights in a row are kept.
    """
    n, k = weight.shape
    w = weight.float().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights carry no output
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_cholesky(h, damp)
    block = BLOCK if nm is None else max(nm[1], BLOCK // nm[1] * nm[1])  # whole N:M groups per block
    for start in range(0, k, block):
        end = min(start + block, k)
        # this block's share of each row's quota, so the shares sum to exactly `quota`
        share = row_quota(end, sparsity) - row_quota(start, sparsity) if nm is None else 0
        w[:, start:end], errors = _prune_block(w[:, start:end], hinv[start:end, start:end], share, nm)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype)


def _prune_block(w: torch.Tensor, hinv: torch.Tensor, share: int, nm: tuple[int, int] | None):
    """Prune one (N, B) block column by column; returns (pruned block, scaled errors (N, B))."""
    w = w.clone()
    d = torch.diag(hinv)  # (B,)
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    if nm is None and share:
        saliency = w.pow(2) / d.pow(2)[None, :]
        mask.scatter_(1, torch.topk(saliency, share, dim=1, largest=False).indices, True)
    errors = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if nm is not None and i % nm[1] == 0:  # choose this group's mask from the updated weights
            keep_n, m = nm
            saliency = w[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
            mask[:, i : i + m].scatter_(1, torch.topk(saliency, m - keep_n, dim=1, largest=False).indices, True)
        col = w[:, i]
        pruned = torch.where(mask[:, i], torch.zeros_like(col), col)
        err = (col - pruned) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        w[:, i] = pruned
        errors[:, i] = err
    return w, errors

"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up
before rounding, and fold the inverse scale into the operation that feeds them, so the float
model is unchanged and only the rounding error moves.

For linears that share an input X (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, down after up_proj, o after v_proj when heads are not grouped) we search
s = mean|X|^a / mean|W|^(1-a) over a grid of a in [0, 1), keeping the s whose quantized weights
Q(W s) / s change the output least, then fold 1/s into the feeding norm or linear. As in the
paper, "output" means the attention block's output for q/k/v and the MLP's for gate/up (measured on
SmolLM2-135M: 49% of RTN's perplexity increase recovered against 38% when scoring each linear's own
output), and the linear's own output for o/down. o_proj is scaled only without grouped-query
attention: tying the scales across the query heads of a kv head was measured not to help. A clipping
search then shrinks each group's range where that lowers the output error (the paper's step 2).
Rounding itself is plain group-wise int4 (`rtn.quantize_int4`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slmkit.compress.quant.rtn import fake_int4, int4_grid, int4_round, pad_columns

GRID = 20
CLIP_SHRINK = 0.5  # search ranges down to half of each group's max
CLIP_TOKENS = 512
SEARCH_TOKENS = 8192
HEAD_SEARCH_TOKENS = 1024  # the head has ~50k outputs per token: fewer tokens score it as surely


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int,
                  output_error: Callable[[list[torch.Tensor]], float] | None = None,
                  tokens: int = SEARCH_TOKENS) -> torch.Tensor:
    """Best per-input-channel scales (K,) for linears sharing input x (tokens, K).

    `output_error(candidate weights)` scores a candidate on what follows the linears (the paper
    scores q/k/v on the attention output and gate/up on the MLP output, so that errors the softmax
    or the gate wash out do not count); by default, on the linears' own outputs.
    """
    x = _subsample(x, tokens)
    w = [weight.float() for weight in weights]  # each (N_i, K)
    error = output_error or _linear_output_error(x, w)
    x_mean = x.abs().mean(dim=0)  # (K,)
    w_mean = _group_normalized_mean(torch.cat(w), group_size)  # (K,)
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for ratio in [i / GRID for i in range(GRID)]:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = error([fake_int4(wi * s[None, :], group_size) / s[None, :] for wi in w])
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def _linear_output_error(x: torch.Tensor, w: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], float]:
    reference = x @ torch.cat(w).T  # (tokens, N_total)
    return lambda candidates: (x @ torch.cat(candidates).T - reference).pow(2).mean().item()


@torch.no_grad()
def module_output_error(linears: list[nn.Linear], run: Callable[[], torch.Tensor]
                        ) -> Callable[[list[torch.Tensor]], float]:
    """Score candidate weights for `linears` by the error they cause in `run()`, the output of a
    module containing them on calibration inputs; the float weights are put back after each try."""
    reference = run()
    originals = [linear.weight.data for linear in linears]

    def error(candidates: list[torch.Tensor]) -> float:
        try:
            for linear, candidate in zip(linears, candidates):
                linear.weight.data = candidate.to(linear.weight.dtype)
            return (run() - reference).float().pow(2).mean().item()
        finally:
            for linear, original in zip(linears, originals):
                linear.weight.data = original

    return error


def _group_normalized_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean over output rows of |w| / max|w in its group|: how large each input column's weights are."""
    n, k = w.shape
    groups = pad_columns(w.abs(), group_size).reshape(n, -1, group_size)
    scaled = groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return scaled.reshape(n, -1)[:, :k].mean(dim=0)


@torch.no_grad()
def apply_scales(feeder: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Fold 1/s into `feeder` (a norm, or a linear's output rows) and s into the inputs.

    A norm's output is (offset + weight) * normalised x (+ bias for a LayerNorm); Gemma's offset
    of 1 means its stored weight becomes (1 + w) / s - 1."""
    if isinstance(feeder, nn.Linear):
        feeder.weight.div_(s[:, None])
        if feeder.bias is not None:
            feeder.bias.div_(s)
    else:
        offset = getattr(feeder, "offset", 0.0)
        feeder.weight.copy_((feeder.weight + offset) / s - offset)
        if getattr(feeder, "bias", None) is not None:
            feeder.bias.div_(s)
    for linear in linears:
        linear.weight.mul_(s[None, :])


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight with each (row, group) range clipped to the shrink ratio of least output error."""
    n, k = weight.shape
    x = pad_columns(_subsample(x, CLIP_TOKENS), group_size)  # (t, Kp)
    w = pad_columns(weight.float(), group_size).reshape(n, -1, group_size)  # (N, G, g)
    xg = x.reshape(x.shape[0], -1, group_size)  # (t, G, g)
    reference = torch.einsum("tgk,ngk->ntg", xg, w)
    full = w.abs().amax(dim=-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full(full.shape, float("inf"))
    best_max = full.clone()
    for i in range(int(CLIP_SHRINK * GRID)):
        limit = full * (1 - i / GRID)
        clipped = w.clamp(-limit, limit)
        scales, zeros = int4_grid(clipped)
        q = (int4_round(clipped, scales[..., None], zeros[..., None]) - zeros[..., None]) * scales[..., None]
        err = (torch.einsum("tgk,ngk->ntg", xg, q) - reference).pow(2).mean(dim=1)[..., None]  # (N, G, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, limit, best_max)
    clipped = w.clamp(-best_max, best_max).reshape(n, -1)[:, :k]
    return clipped.to(weight.dtype)


def _subsample(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Every j-th row so that at most `rows` remain (deterministic, spread over all samples)."""
    x = x.reshape(-1, x.shape[-1]).float()
    step = max(1, x.shape[0] // rows)
    return x[::step][:rows]

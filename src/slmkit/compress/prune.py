"""Unstructured and N:M pruning: magnitude, Wanda and SparseGPT, block by block over calibration.

- magnitude: drop the smallest |W| in each row (the floor every method must beat);
- wanda (Sun et al., 2023; locuslab/wanda): drop the smallest |W_ij| * ||X_j|| in each row, where
  ||X_j|| is the norm of input feature j over the calibration tokens: no weight update;
- sparsegpt (`slmkit.compress.sparsegpt`): OBS saliency with error compensation.

Blocks are pruned in order and each block's calibration inputs are the outputs of the blocks
already pruned (as both references do). The output head and the embedding are kept (the references
do the same; in SmolLM2 they are one tied matrix). The result is a normal float checkpoint whose
zeros are the mask, with a `pruning` section in its config; `sparsity_masks` lets the training loop
keep those zeros at zero when the model is fine-tuned or distilled.

Unstructured and 2:4 sparsity make the model no faster on a CPU with PyTorch's dense kernels: they
are for quality research and as a start for further compression. Speed comes from
`slmkit.compress.structured` (a smaller dense model) or from quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from slmkit.compress.calibrate import (
    BLOCK_LINEARS,
    BlockInputs,
    LinearStats,
    block_linears,
    block_stats,
    check_calibration,
)
from slmkit.compress.sparsegpt import row_quota, sparsegpt_prune
from slmkit.errors import SlmError, unknown_choice

METHODS = ("magnitude", "wanda", "sparsegpt")
UNSTRUCTURED = METHODS

@dataclass
class PruneConfig:
    method: str = field(default="wanda", metadata={"choices": ("magnitude", "wanda", "sparsegpt")})
    """magnitude | wanda | sparsegpt"""
    sparsity: float | None = None
    """share of each row's weights to remove, in (0, 1) (give this or `pattern`)"""
    pattern: str | None = None
    """N:M semi-structured sparsity, e.g. 2:4 = at most 2 non-zeros in every 4 consecutive weights"""
    calib: str | None = None
    """calibration text file or `slm prepare` directory (default: the start of the shared WikiText-2 valid text)"""
    calib_samples: int = 64
    """calibration windows"""
    calib_seq_len: int = 512
    """tokens per calibration window"""
    damp: float = 0.01
    """SparseGPT: Hessian dampening, as a share of its mean diagonal"""

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"


@dataclass
class PruneReport:
    method: str
    target: str
    pruned_linears: int
    zeros: int
    weights: int

    def summary(self) -> str:
        return (f"{self.method} {self.target}: {self.pruned_linears} linears, {self.zeros / 1e6:.2f}M of "
                f"{self.weights / 1e6:.2f}M weights are zero ({self.zeros / max(self.weights, 1):.1%})")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep n of every m."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise SlmError(f"pattern '{pattern}' is not N:M (e.g. 2:4: keep 2 of every 4 weights)") from None
    if not 0 < n < m:
        raise SlmError(f"pattern '{pattern}' must keep some but not all weights of each group: 0 < N < M")
    return n, m


def check_prune(model: nn.Module, cfg: PruneConfig) -> list[str]:
    """The linears to prune, after checking every setting against the model (before any work)."""
    if cfg.method not in METHODS:
        raise unknown_choice("pruning method", cfg.method, METHODS)
    if (cfg.sparsity is None) == (cfg.pattern is None):
        raise SlmError("give exactly one of --sparsity (e.g. 0.5) or --pattern (e.g. 2:4)")
    if cfg.sparsity is not None and not 0 < cfg.sparsity < 1:
        raise SlmError(f"sparsity {cfg.sparsity} is outside (0, 1); e.g. --sparsity 0.5 removes half the weights")
    if model.config.quantization or model.config.lowrank:
        raise SlmError("prune the float model, then quantize or factorize it (this one is already compressed)")
    names = [f"model.layers.{i}.{n}" for i, block in enumerate(model.model.layers) for n in block_linears(block)
             if isinstance(_get(model, f"model.layers.{i}.{n}"), nn.Linear)]
    if not names:
        raise SlmError("the model has no dense attention/MLP linears to prune (mixture-of-experts is not supported)")
    if cfg.pattern is not None:
        n, m = parse_pattern(cfg.pattern)
        for name in names:
            k = model.get_submodule(name).in_features
            if k % m:
                raise SlmError(f"pattern {cfg.pattern} does not divide {name}'s {k} inputs into groups of {m}; "
                               f"choose an M that divides every layer's input width")
    if cfg.calibrated and (cfg.calib_samples < 1 or cfg.calib_seq_len < 8):
        raise SlmError("calibration needs at least 1 sample of at least 8 tokens")
    return names


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def prune_model(model: nn.Module, cfg: PruneConfig, calib_ids: torch.Tensor | None = None,
                progress: bool = True) -> PruneReport:
    """Prune `model` in place (fp32); returns what was done. calib_ids: (samples, T) for wanda/sparsegpt."""
    names = check_prune(model, cfg)
    nm = parse_pattern(cfg.pattern) if cfg.pattern else None
    model.float().eval()
    if cfg.calibrated:
        _prune_calibrated(model, cfg, check_calibration(model, calib_ids, cfg.method), nm, progress)
    else:
        for name in tqdm(names, desc="magnitude", unit="linear", disable=not progress):
            weight = model.get_submodule(name).weight
            weight.copy_(prune_by_score(weight, weight.abs(), cfg.sparsity, nm))
    model.config.pruning = {"method": cfg.method, "sparsity": cfg.sparsity, "pattern": cfg.pattern,
                            "linears": "attention and MLP"}
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    return PruneReport(cfg.method, cfg.pattern or f"{cfg.sparsity:.0%}", len(names), zeros, weights)


def _prune_calibrated(model, cfg: PruneConfig, ids: torch.Tensor, nm, progress: bool) -> None:
    inputs = BlockInputs(model, ids)
    layers = model.model.layers
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} ({inputs.tokens:,} calibration tokens)", unit="layer",
               disable=not progress)
    for i in bar:
        block = layers[i]
        stats = block_stats(block, inputs)  # every linear's inputs, before this block is pruned
        for name in block_linears(block):
            weight = block.get_submodule(name).weight
            if cfg.method == "wanda":
                weight.copy_(prune_by_score(weight, wanda_score(weight, stats[name]), cfg.sparsity, nm))
            else:
                weight.copy_(sparsegpt_prune(weight, stats[name].hessian, cfg.sparsity or 0.0, nm, cfg.damp))
        inputs.run(block, advance=True)  # the next block sees this block's pruned outputs


def wanda_score(weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    """|W_ij| * ||X_j||: a weight matters as much as the input it multiplies, (N, K)."""
    return weight.abs() * stats.column_norms[None, :]


def prune_by_score(weight: torch.Tensor, score: torch.Tensor, sparsity: float | None,
                   nm: tuple[int, int] | None) -> torch.Tensor:
    """`weight` with the lowest-scoring entries zeroed: int(K x sparsity) per row, or m - n per group."""
    n_out, k = weight.shape
    if nm is not None:
        keep, m = nm
        groups = score.reshape(n_out, k // m, m)
        drop = torch.topk(groups, m - keep, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(n_out, k)
    else:
        drop = torch.topk(score, row_quota(k, sparsity), dim=1, largest=False).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    return weight.masked_fill(mask, 0.0)


def sparsity_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """For a model pruned by this module: each pruned weight -> its bool mask of kept entries, so
    the training loop can put the zeros back after every optimizer step (fine-tuning, healing)."""
    section = getattr(model.config, "pruning", None) or {}
    if section.get("method") not in UNSTRUCTURED:
        return {}
    masks = {}
    for name, module in model.named_modules():
        if name.endswith(BLOCK_LINEARS) and isinstance(module, nn.Linear) and module.weight.requires_grad:
            masks[module.weight] = module.weight.detach() != 0
    return masks


@torch.no_grad()
def keep_zeros(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    for weight, kept in masks.items():
        weight.mul_(kept)

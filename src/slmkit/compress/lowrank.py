"""Low-rank factorization: each chosen linear W (N out, K in) becomes two thinner ones, up @ down.

- svd: W = U S V^T truncated to rank r, split evenly: up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T.
  Needs no data; it keeps what is large in W, which is not what matters to the layer's outputs.
- whitened (SVD-LLM, Wang et al. 2024, arXiv 2403.07378; AIoT-MLSys-Lab/SVD-LLM): with
  X^T X = S S^T (Cholesky, S lower) from calibration inputs X, take the SVD of W S = U Σ V^T and
  keep up = U_r sqrt(Σ_r), down = sqrt(Σ_r) V_r^T S^-1. The output error ||X W^T - X W'^T||_F^2
  is then exactly the sum of the dropped Σ_i^2, so truncation minimizes it for the rank.

Rank: two factors cost r (N + K) weights against N K, so they are smaller only below the
break-even rank N K / (N + K). `keep` is the share of each linear's parameters the pair keeps:
r = floor(keep N K / (N + K)). `ranks="sensitivity"` spends the same total differently: it measures,
for every linear, how much of its calibration output each rank-1 component carries (exact, from one
SVD) and hands out ranks greedily where they remove the most relative output error per parameter.
That minimizes the summed per-linear error, which is only a proxy: on SmolLM2-135M at keep 0.8
(whitened, 16x256 calibration tokens, perplexity on 2k WikiText-2 tokens) it gave 135 against
uniform's 134 (dense 36, plain svd ~1.9e7), so uniform is the default. It costs a second pass.

Calibrated runs go block by block over `BlockInputs`, each block seeing the outputs of the blocks
already factorized, so later blocks are whitened for the inputs they will really get; within a
block every linear reads the block's unfactorized inputs (as GPTQ without true-sequential). Only the attention and MLP projections are
factorized by default: the embedding is a lookup, and SmolLM2's output head is that same matrix.

The result loads in slmkit (`config.lowrank` records each linear's rank; `slmkit.layers`'
`LowRankLinear` holds `down.weight` (r, K) and `up.weight` (N, r)). Its config.json says
model_type llama plus an `slmkit_lowrank` section, but transformers cannot load the weights (it
would start those linears from random values), and llama.cpp has no factorized linears: `densify`
multiplies the factors back (`slm export gguf --densify`). Not done here: SVD-LLM's second stage
(a LoRA-style update of the factors), and quantizing the factors afterwards.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from slmkit.compress.calibrate import (
    BLOCK_LINEARS,
    BlockInputs,
    block_stats,
    check_calibration,
)
from slmkit.errors import SlmError, unknown_choice
from slmkit.layers import LowRankLinear, swap_linears, untie_head

METHODS = ("svd", "whitened")
ALLOCATIONS = ("uniform", "sensitivity")
TARGETS = tuple(name.rpartition(".")[2] for name in BLOCK_LINEARS) + ("lm_head",)
MIN_RANK_SHARE = 0.5  # sensitivity never cuts a linear below half its uniform rank (0.25 measured worse)
MAX_DAMP_TRIES = 8


@dataclass
class LowRankConfig:
    method: str = field(default="whitened", metadata={"metavar": "{svd,whitened}"})
    """svd (no data) | whitened (SVD-LLM: weights the truncation by calibration inputs)"""
    keep: float = 0.8
    """share of each factorized linear's parameters kept, in (0, 1): rank = floor(keep N K / (N + K))"""
    ranks: str = field(default="uniform", metadata={"metavar": "{uniform,sensitivity}"})
    """uniform (every linear keeps `keep`) | sensitivity (same total, ranks where outputs need them)"""
    calib: str | None = None
    """calibration text file or `slm prepare` directory (default: the start of the shared WikiText-2 valid text)"""
    calib_samples: int = 64
    """calibration windows"""
    calib_seq_len: int = 512
    """tokens per calibration window"""
    targets: list[str] = field(default_factory=lambda: list(TARGETS[:-1]))
    """linears to factorize, by short name: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head"""
    damp: float = 0.01
    """whitened: ridge added to X^T X's diagonal (share of its mean) when it is not positive definite; grows 10x"""

    @property
    def calibrated(self) -> bool:
        return self.method == "whitened" or self.ranks == "sensitivity"


@dataclass
class LowRankReport:
    method: str
    keep: float
    allocation: str
    ranks: dict[str, int]
    params_before: int  # the factorized linears' weights before
    params_after: int  # and their factors' weights after

    def summary(self) -> str:
        low, high = min(self.ranks.values()), max(self.ranks.values())
        span = f"rank {low}" if low == high else f"ranks {low}-{high}"
        return (f"{self.method} keep {self.keep:g} ({self.allocation}): {len(self.ranks)} linears factorized, "
                f"{span}, {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M weights "
                f"({self.params_after / max(self.params_before, 1):.1%})")


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------


def break_even_rank(n: int, k: int) -> float:
    """The rank at which factors (r (N + K) weights) cost as much as the (N, K) matrix."""
    return n * k / (n + k)


def rank_for(n: int, k: int, keep: float) -> int:
    """floor(keep N K / (N + K)): the rank whose two factors hold `keep` of the N K weights."""
    return math.floor(keep * break_even_rank(n, k))


def max_rank(n: int, k: int) -> int:
    """The largest rank still below break-even (factors strictly smaller than the matrix)."""
    return (n * k - 1) // (n + k)


def allocate_ranks(energy: dict[str, list[float]], shapes: dict[str, tuple[int, int]],
                   uniform: dict[str, int]) -> dict[str, int]:
    """Per-linear ranks costing no more than `uniform` in all, given greedily to the next rank-1
    component with the most relative output energy per parameter.

    energy[name][i]: share of the linear's calibration output carried by component i (so keeping
    rank r leaves sum(energy[r:]) as relative error). Each linear keeps at least MIN_RANK_SHARE of
    its uniform rank and stays below break-even.
    """
    cost = {name: sum(shapes[name]) for name in uniform}
    left = sum(uniform[name] * cost[name] for name in uniform)
    ranks = {name: max(1, math.floor(MIN_RANK_SHARE * uniform[name])) for name in uniform}
    left -= sum(ranks[name] * cost[name] for name in uniform)
    cap = {name: max_rank(*shapes[name]) for name in uniform}
    heap = [(-energy[name][ranks[name]] / cost[name], name) for name in uniform if ranks[name] < cap[name]]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if cost[name] > left:
            continue  # no room for this one; a cheaper linear may still fit
        ranks[name] += 1
        left -= cost[name]
        if ranks[name] < cap[name]:
            heapq.heappush(heap, (-energy[name][ranks[name]] / cost[name], name))
    return ranks


# ---------------------------------------------------------------------------------------------
# Factors of one linear (float64: a Cholesky factor and its inverse lose digits fast in fp32)
# ---------------------------------------------------------------------------------------------


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) in fp32 from the plain truncated SVD of weight (N, K)."""
    u, s, vt = torch.linalg.svd(weight.double(), full_matrices=False)  # (N, m), (m,), (m, K)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vt[:rank]).float()


def whitening(xtx: torch.Tensor, damp: float) -> torch.Tensor:
    """S (K, K) lower triangular, float64, with S S^T = X^T X (+ a ridge if it is not positive definite)."""
    c = xtx.double()
    c = (c + c.T) / 2
    scale = float(c.diagonal().mean()) or 1.0
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    ridge = 0.0
    for _ in range(MAX_DAMP_TRIES):
        s, info = torch.linalg.cholesky_ex(c + ridge * scale * eye)
        if int(info) == 0:
            return s
        ridge = damp if ridge == 0 else ridge * 10
    raise SlmError(f"the calibration inputs' X^T X is not positive definite even with a ridge of {ridge:g} x its "
                   "mean diagonal; give more calibration text (--calib-samples) or a larger --damp")


def whitened_factors(weight: torch.Tensor, xtx: torch.Tensor, rank: int,
                     damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) in fp32 from SVD-LLM's truncation of W S, where S S^T = xtx (K, K)."""
    s = whitening(xtx, damp)  # (K, K) lower
    u, sigma, vt = torch.linalg.svd(weight.double() @ s, full_matrices=False)  # (N, m), (m,), (m, K)
    root = sigma[:rank].sqrt()
    down = torch.linalg.solve_triangular(s, vt[:rank], upper=False, left=False)  # V_r^T S^-1, (r, K)
    return (u[:, :rank] * root).float(), (root[:, None] * down).float()


def output_energy(weight: torch.Tensor, xtx: torch.Tensor, method: str, damp: float = 0.01) -> list[float]:
    """Share of the linear's calibration output energy ||X W^T||^2 carried by each rank-1 component
    of `method`'s factorization, in the order truncation drops them last to first.

    whitened: Σ_i^2 of W S. svd: s_i^2 v_i^T (X^T X) v_i (the output energy of u_i s_i v_i^T).
    """
    if method == "whitened":
        energy = torch.linalg.svdvals(weight.double() @ whitening(xtx, damp)).square()
    else:
        _, s, vt = torch.linalg.svd(weight.double(), full_matrices=False)  # vt: (m, K)
        energy = s.square() * ((vt @ xtx.double()) * vt).sum(dim=1)
    return (energy / energy.sum().clamp_min(1e-30)).tolist()


def _lowrank_module(linear: nn.Linear, factors: tuple[torch.Tensor, torch.Tensor]) -> LowRankLinear:
    up, down = factors
    bias = None if linear.bias is None else linear.bias.detach().float()
    return LowRankLinear.from_factors(up, down, bias)


# ---------------------------------------------------------------------------------------------
# A whole model
# ---------------------------------------------------------------------------------------------


def check_lowrank(model: nn.Module, cfg: LowRankConfig) -> dict[str, tuple[int, int]]:
    """The linears to factorize with their (N, K), after checking every setting (before any work)."""
    if cfg.method not in METHODS:
        raise unknown_choice("low-rank method", cfg.method, list(METHODS))
    if cfg.ranks not in ALLOCATIONS:
        raise unknown_choice("rank allocation", cfg.ranks, list(ALLOCATIONS))
    if not 0 < cfg.keep < 1:
        raise SlmError(f"keep {cfg.keep:g} is outside (0, 1): it is the share of each linear's parameters its two "
                       "factors keep, and at 1 or more they are no smaller than the linear (break-even rank "
                       "N*K/(N+K)); e.g. --keep 0.8")
    if model.config.quantization or model.config.lowrank:
        raise SlmError("factorize the float model, then quantize it (this one is already quantized or factorized)")
    if cfg.calibrated and (cfg.calib_samples < 1 or cfg.calib_seq_len < 8):
        raise SlmError("calibration needs at least 1 sample of at least 8 tokens")
    shapes = {name: (m.out_features, m.in_features) for name, m in _target_linears(model, cfg.targets)}
    for name, (n, k) in shapes.items():
        if rank_for(n, k, cfg.keep) < 1:
            raise SlmError(f"keep {cfg.keep:g} leaves {name} ({n}x{k}, break-even rank "
                           f"{break_even_rank(n, k):.1f}) with rank 0; raise --keep")
    return shapes


def _target_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    if not targets:
        raise SlmError(f"no linears to factorize: give targets from {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            raise unknown_choice("low-rank target", t, list(TARGETS))
    wanted = tuple("." + t for t in targets if t != "lm_head")
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and ((name.startswith("model.layers.") and name.endswith(wanted))
                   or (name == "lm_head" and "lm_head" in targets))]
    if not chosen:
        raise SlmError(f"none of the targets {', '.join(targets)} is a dense linear of this model "
                       "(mixture-of-experts MLPs are not factorized)")
    return chosen


@torch.no_grad()
def factorize_model(model: nn.Module, cfg: LowRankConfig, calib_ids: torch.Tensor | None = None,
                    progress: bool = True) -> LowRankReport:
    """Factorize `model` in place (fp32); returns what was done. calib_ids: (samples, T) token ids
    for whitened or sensitivity ranks (`slmkit.data.calibration`)."""
    shapes = check_lowrank(model, cfg)
    ids = check_calibration(model, calib_ids, f"{cfg.method} low-rank") if cfg.calibrated else None
    model.float().eval()
    ranks = {name: rank_for(n, k, cfg.keep) for name, (n, k) in shapes.items()}
    if cfg.ranks == "sensitivity":
        ranks = allocate_ranks(measure_energy(model, cfg, ids, list(shapes), progress), shapes, ranks)
    if "lm_head" in ranks:
        untie_head(model)
    if cfg.method == "whitened":
        _factorize_whitened(model, ids, ranks, cfg.damp, progress)
    else:
        _factorize_svd(model, ranks, progress)
    model.config.lowrank = {"method": cfg.method, "keep": cfg.keep, "allocation": cfg.ranks, "ranks": ranks}
    return LowRankReport(cfg.method, cfg.keep, cfg.ranks, ranks, sum(n * k for n, k in shapes.values()),
                         sum(r * sum(shapes[name]) for name, r in ranks.items()))


def _factorize_svd(model: nn.Module, ranks: dict[str, int], progress: bool) -> None:
    made = {}
    for name, rank in tqdm(ranks.items(), desc="svd", unit="linear", disable=not progress):
        linear = model.get_submodule(name)
        made[name] = _lowrank_module(linear, svd_factors(linear.weight, rank))
    swap_linears(model, lambda name, _linear: made.get(name))


def _factorize_whitened(model: nn.Module, ids: torch.Tensor, ranks: dict[str, int], damp: float,
                        progress: bool) -> None:
    def visit(name: str, linear: nn.Linear, xtx: torch.Tensor) -> LowRankLinear:
        return _lowrank_module(linear, whitened_factors(linear.weight, xtx, ranks[name], damp))

    _walk(model, ids, list(ranks), visit, "whitened", progress)


def measure_energy(model: nn.Module, cfg: LowRankConfig, ids: torch.Tensor, names: list[str],
                   progress: bool) -> dict[str, list[float]]:
    """`output_energy` of every linear in `names`, on the unfactorized model's calibration inputs."""
    energy: dict[str, list[float]] = {}

    def visit(name: str, linear: nn.Linear, xtx: torch.Tensor) -> None:
        energy[name] = output_energy(linear.weight, xtx, cfg.method, cfg.damp)

    _walk(model, ids, names, visit, "sensitivity", progress)
    return energy


Visit = Callable[[str, nn.Linear, torch.Tensor], nn.Module | None]


def _walk(model: nn.Module, ids: torch.Tensor, names: list[str], visit: Visit, desc: str, progress: bool) -> None:
    """Call visit(name, linear, X^T X / rows) for every linear in `names`, block by block over the
    calibration inputs; a module it returns replaces the linear before the block's outputs go on
    to the next block, so later blocks are calibrated on what the factorized ones produce."""
    inputs = BlockInputs(model, ids)
    layers = model.model.layers
    bar = tqdm(range(len(layers)), desc=f"{desc} ({inputs.tokens:,} calibration tokens)", unit="layer",
               disable=not progress)
    for i in bar:
        block, prefix = layers[i], f"model.layers.{i}."
        mine = [name for name in names if name.startswith(prefix)]
        if mine:
            stats = block_stats(block, inputs)  # X^T X of every linear's inputs, before this block changes
            _swap(model, {name: visit(name, model.get_submodule(name), stats[name.removeprefix(prefix)].xtx)
                          for name in mine})
        inputs.run(block, advance=True)
    if "lm_head" in names:
        x = inputs.final_norm()  # (n*T, C)
        _swap(model, {"lm_head": visit("lm_head", model.lm_head, x.T @ x / x.shape[0])})


def _swap(model: nn.Module, made: dict[str, nn.Module | None]) -> None:
    if any(m is not None for m in made.values()):
        swap_linears(model, lambda name, _linear: made.get(name))



def densify(model: nn.Module) -> int:
    """Multiply every `LowRankLinear`'s factors back into a plain `nn.Linear` (same outputs up to
    rounding, the original size) and drop the `lowrank` config section; returns how many. For
    runtimes without factorized linears: llama.cpp (GGUF), transformers."""
    count = swap_linears(model, lambda _name, layer: layer.to_linear(), kinds=(LowRankLinear,))
    model.config.lowrank = None
    return count

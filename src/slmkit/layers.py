"""Drop-in replacements for `nn.Linear`, and the one function that swaps them into a model.

A replacement keeps the original `weight`/`bias` Parameters (so state-dict names, tied
embeddings and checkpoints are unchanged) and only changes how the product is computed. The
quantized linears live in `slmkit.compress.quant.qlinear` and the LoRA/DoRA wrappers in
`slmkit.adapters.lora`; all of them are put in place by `swap_linears`.

`LowRankLinear` is the exception: a factorized linear has no (N, K) weight to keep, so its
checkpoint names change (`q_proj.down.weight`, `q_proj.up.weight`); the model's config records
each one's rank (`lowrank` section) and `swap_in_lowrank` rebuilds them before weights are loaded.
Factorizing (choosing the factors) is `slmkit.compress.lowrank`'s job.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import SlmError

UPCAST_MIN_ROWS = 4  # below this a bf16 GEMV is memory-bound and fastest as it is


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read): machines of one
    kind differ (AVX2 only, AVX-512 with bf16, AMX), so features are read at run time, never assumed."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512_BF16 or AMX), where bf16 GEMMs are fast --
    unless PyTorch is held to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 or default), as on a CPU without them."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


class UpcastLinear(nn.Linear):
    """A bf16 Linear whose multi-row products run in fp32.

    Why: on CPUs without bf16 units (e.g. AMD Zen 3, most laptops) PyTorch's bf16 GEMM is ~5x
    slower than fp32 for prompts and batches, while a single-row product (decoding one token) is
    memory-bound and twice as fast in bf16. So one row stays bf16; more rows convert the weight
    into a reused fp32 scratch buffer (no fresh allocation, no page faults) and multiply in fp32.
    """

    _scratch = threading.local()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] < UPCAST_MIN_ROWS or x.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        weight = self._fp32_weight()
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), weight, bias).to(x.dtype)

    def _fp32_weight(self) -> torch.Tensor:
        buffers = self._scratch.__dict__.setdefault("by_shape", {})
        key = (tuple(self.weight.shape), self.weight.device)
        if key not in buffers:
            buffers[key] = torch.empty(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        return buffers[key].copy_(self.weight)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None],
                 kinds: tuple[type, ...] = (nn.Linear,)) -> int:
    """Replace each module of `kinds` (nn.Linear by default; adapters also wrap quantized linears)
    for which `make(name, module)` returns a module; returns the count. Modules found inside a
    replacement are not visited again (the list is taken before anything is swapped)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]
    swapped = 0
    for name, linear in targets:
        new = make(name, linear)
        if new is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        swapped += 1
    return swapped


class LowRankLinear(nn.Module):
    """A linear (N out, K in) stored as two thinner ones of rank r: y = up(down(x)).

    Parameters (state-dict names under the replaced linear's name): `down.weight` (r, K),
    `up.weight` (N, r) and `up.bias` (N,) when the original had a bias. r (N + K) weights instead
    of N K, and two products of that size per token, so it is smaller and faster only below the
    break-even rank N K / (N + K). The factors are plain `nn.Linear`s, so the bf16 upcast (and
    anything else that swaps linears) applies to them unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """The module whose product is up @ down: up (N, r), down (r, K), bias (N,) or None."""
        (n, r), k = up.shape, down.shape[1]
        layer = cls(k, n, r, bias=bias is not None, device="meta")
        layer.down.weight = nn.Parameter(down.contiguous())
        layer.up.weight = nn.Parameter(up.contiguous())
        if bias is not None:
            layer.up.bias = nn.Parameter(bias.detach().clone())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., K) -> (..., r) -> (..., N)

    def dense_weight(self) -> torch.Tensor:
        """The (N, K) weight the factors stand for, multiplied in fp32."""
        return self.up.weight.float() @ self.down.weight.float()

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the same outputs (up to rounding) and the original size."""
        weight = self.up.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        dense.weight = nn.Parameter(self.dense_weight().to(weight.dtype))
        if self.up.bias is not None:
            dense.bias = self.up.bias
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_in_lowrank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each linear named in `ranks` (full names, e.g. `model.layers.0.self_attn.q_proj`)
    by an empty `LowRankLinear` of that rank on the linear's device, so a factorized checkpoint's
    `down`/`up` weights can be assigned into it."""

    def make(name: str, linear: nn.Module) -> nn.Module | None:
        if name not in ranks:
            return None
        return LowRankLinear(linear.in_features, linear.out_features, int(ranks[name]),
                             bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)

    swapped = swap_linears(model, make)
    if swapped != len(ranks):
        linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        stray = sorted(set(ranks) - linears)
        raise SlmError(f"the checkpoint's lowrank section names {stray[:3]}, which are not linears of this model; "
                       "the config.json does not belong to these weights")


def untie_head(model: nn.Module) -> None:
    """Give a tied output head its own weight, so compressing it leaves the embedding (a full lookup
    table) alone; the config then says the two are separate."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _as_upcast(_name: str, linear: nn.Linear) -> nn.Module | None:
    if type(linear) is not nn.Linear or linear.weight.dtype != torch.bfloat16:
        return None
    new = UpcastLinear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: names and ties unchanged
    return new


def prepare_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Make a bf16 model fast on this CPU (idempotent; a no-op where bf16 GEMMs are native)."""
    if not cpu_has_native_bf16():
        swap_linears(model, _as_upcast)
    return model

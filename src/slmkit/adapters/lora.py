"""LoRA and DoRA: trainable low-rank updates beside any linear, float or quantized, as PEFT computes them.

`LoRALinear` wraps a base layer (`nn.Linear`, `Int8Linear`, `Int4Linear`) that stays frozen:

    LoRA:  y = base(x) + s * B(A(dropout(x)))                       s = alpha / r  (alpha / sqrt(r): rsLoRA)
    DoRA:  y = base(x) + (g - 1) * (base(x) - b) + g * s * B(A(x)),  g = m / ||W + s * B A||_row (no gradient)

A is (r, in), initialised Kaiming-uniform as in PEFT; B is (out, r), zero, so a fresh adapter
changes nothing; m (DoRA's magnitude) starts at the row norms of W. The attribute names are PEFT's
(`lora_A`, `lora_B`, `lora_magnitude_vector`, `base_layer`), so our state-dict keys are PEFT's
keys without the `base_model.model.` prefix and the adapter's file format is a rename away
(`slmkit.interop.peft`).

Why not import peft: its LoRA layer is bound to transformers' model classes and to its own
dispatch over a dozen backends; ours wraps our packed int4/int8 kernels, which peft cannot, in
about a hundred lines. Parity with peft is a test, not an assumption.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.compress.quant.qlinear import QuantLinear
from slmkit.errors import SlmError
from slmkit.layers import swap_linears

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output head
LINEAR_KINDS = (nn.Linear, QuantLinear)
LORA_PARTS = ("lora_A", "lora_B", "base_layer")


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the update B A."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Linear names to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head), or all-linear (all but lm_head)."""
    layers: list[int] = field(default_factory=list)
    """Block indices to adapt (PEFT's layers_to_transform; negative ones count from the top: -8 is the eighth block from the last); empty adapts every block. Adapting only the top blocks stops the backward pass there: faster steps."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    dora: bool = False
    """DoRA: learn a per-row magnitude too (Liu et al. 2024), as PEFT's use_dora."""


def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a layer multiplies by, dequantized for a quantized one."""
    return layer.dequantized(cache=True) if isinstance(layer, QuantLinear) else layer.weight


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = scaling(alpha, r, rslora)
        dtype = dtype or _adapter_dtype(base_layer)
        device = _device(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = None
        if dora:  # at B = 0 the magnitude is the row norms of W: the layer starts unchanged
            norms = torch.linalg.norm(base_weight(base_layer).detach().float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norms.to(dtype=dtype, device=device))
        self._norm_cache: torch.Tensor | None = None  # DoRA's row norms, kept while not training

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self._norm_cache = None

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:  # under autocast each product picks its own dtype: a cast here would be a wasted copy
            x = x.to(self.lora_A.weight.dtype)
        if self.dora:
            return result + self._dora_term(x, result).to(result.dtype)
        down = self.lora_A(self.lora_dropout(x))  # (..., r)
        if autocast or down.dtype == result.dtype:
            return self._add_up_projection(result, down)
        return result + (self.lora_B(down) * self.scaling).to(result.dtype)  # e.g. a bf16 base, fp32 adapter

    def _add_up_projection(self, result: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """result + s·down·Bᵀ as one addmm: the scale and the sum ride in the GEMM instead of two
        passes over an (N, out) temporary per adapted layer, which is most of LoRA's cost at r = 16."""
        flat = torch.addmm(result.reshape(-1, self.out_features), down.reshape(-1, self.r),
                           self.lora_B.weight.t(), alpha=self.scaling)
        return flat.view(result.shape)

    def _dora_term(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA: with no dropout the base output is reused; with dropout it is recomputed
        on the dropped input (so the magnitude scales what the adapter sees)."""
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result if bias is None else result - bias
        else:
            x = self.lora_dropout(x)
            base_result = F.linear(x, base_weight(self.base_layer).to(x.dtype))
        scale = (self.lora_magnitude_vector / self._row_norms()).view(1, -1)  # (1, out)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        return (scale - 1) * base_result.to(x.dtype) + scale * lora

    def _row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, detached (DoRA section 4.3); cached in eval mode."""
        if self._norm_cache is not None and not self.training:
            return self._norm_cache
        with torch.no_grad():
            norms = torch.linalg.norm(self._merged_float(), dim=1).to(self.lora_A.weight.dtype)
        if not self.training:
            self._norm_cache = norms
        return norms

    def train(self, mode: bool = True):
        self._norm_cache = None  # the adapter may change before the next evaluation
        return super().train(mode)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, (out, in) fp32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _merged_float(self) -> torch.Tensor:
        return base_weight(self.base_layer).detach().float() + self.delta_weight()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight of one linear that computes what this layer computes (eval mode)."""
        merged = self._merged_float()
        if self.dora:
            merged = merged * (self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1))[:, None]
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dora={self.dora}"


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Float bases: the base's dtype; quantized bases: fp32 (their kernels return the caller's dtype)."""
    return torch.float32 if isinstance(layer, QuantLinear) else layer.weight.dtype


def _device(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.buffers()), None) if isinstance(layer, QuantLinear) else layer.weight
    return tensor.device if tensor is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the linears an adapter may wrap (float or quantized, not inside an adapter)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, LINEAR_KINDS) and name.rpartition(".")[2] not in LORA_PARTS]


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the linears `targets` selects (leaf names such as q_proj, or all-linear)."""
    names = linear_names(model)
    leaves = sorted({n.rpartition(".")[2] for n in names})
    if not targets:
        raise SlmError(f"lora.targets is empty; name the linears to adapt ({', '.join(leaves)}) or all-linear")
    chosen: list[str] = []
    for target in targets:
        if target == ALL_LINEAR:
            chosen += [n for n in names if n != "lm_head"]
            continue
        found = [n for n in names if n == target or n.endswith("." + target)]
        if not found:
            raise SlmError(f"unknown lora target '{target}'; this model's linears are {', '.join(leaves)} "
                           f"(or {ALL_LINEAR})")
        chosen += found
    return list(dict.fromkeys(chosen))


def in_layers(model: nn.Module, names: list[str], layers: list[int]) -> list[str]:
    """The `names` inside the blocks `layers` picks (all of them when it is empty)."""
    if not layers:
        return names
    count = len(model.model.layers)
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise SlmError(f"lora.layers {bad} are outside this model's {count} blocks (0..{count - 1}, or -{count}..-1)")
    keep = {i % count for i in layers}
    return [n for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) in keep]


def adapted_blocks(names: list[str]) -> list[int]:
    """The block indices that adapted linears `names` sit in."""
    return sorted({int(m[1]) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))})


def check_rank(model: nn.Module, names: list[str], r: int) -> None:
    if r < 1:
        raise SlmError(f"lora.r must be at least 1, got {r}")
    for name in names:
        layer = model.get_submodule(name)
        width = min(layer.in_features, layer.out_features)
        if r > width:
            raise SlmError(f"lora.r={r} is larger than the width {width} of '{name}' "
                           f"({layer.out_features}x{layer.in_features}); choose r <= {width}")


def add_lora(model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None) -> list[str]:
    """Wrap the chosen linears of `model` in fresh adapters (checked before anything changes),
    freeze everything else, and return the wrapped names."""
    if cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise SlmError(f"lora.alpha must be > 0 and lora.dropout in [0, 1), got {cfg.alpha} and {cfg.dropout}")
    names = in_layers(model, resolve_targets(model, cfg.targets), cfg.layers)
    check_rank(model, names, cfg.r)
    model.requires_grad_(False)

    def make(name: str, layer: nn.Module) -> nn.Module | None:
        if name not in names:
            return None
        wrapped = LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora)
        wrapped.reset_parameters(generator)
        return wrapped

    swap_linears(model, make, LINEAR_KINDS)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors under our (HF-style) names: `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.dora:
            out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return out


def merge_lora(model: nn.Module) -> int:
    """Fold every float-based adapter into its base weights (the model no longer has adapters);
    returns how many layers were merged. Quantized bases are merged by `slmkit.adapters.merge`."""
    def make(_name: str, layer: nn.Module) -> nn.Module | None:
        if not isinstance(layer, LoRALinear):
            return None
        if isinstance(layer.base_layer, QuantLinear):
            raise SlmError("this adapter sits on a quantized base; merge it with `slm merge` (dequantize, "
                           "merge, requantize)")
        base = layer.base_layer
        with torch.no_grad():
            base.weight = nn.Parameter(layer.merged_weight().to(base.weight.dtype), requires_grad=False)
        return base

    return swap_linears(model, make, (LoRALinear,))

"""Fold adapters into their base weights (`slm merge`), and give several adapters one base (`slm serve`).

Merging a float base is exact up to rounding: W' = W + s B A (DoRA: rescaled to its magnitudes).
A quantized base cannot hold W' as it is: its weights are dequantized, merged, and quantized again
in the base's own format (int8 per row, int4 RTN in the base's groups), and the report says what
that rounding costs, as a share of the adapter's own change: ||Q(W') - W'|| / ||W' - W||. When that
share nears 1 the rounding erases the adapter, and the adapter should be kept separate instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.adapters.lora import LoRALinear
from slmkit.compress.quant.fused import fuse_shared_inputs
from slmkit.compress.quant.qlinear import Int4Linear, Int8Linear, QuantLinear
from slmkit.compress.quant.rtn import quantize_int4, quantize_int8
from slmkit.layers import swap_linears


@dataclass
class MergeReport:
    merged: int = 0
    requantized: int = 0
    lost: list[float] = field(default_factory=list)  # per requantized layer: rounding error / adapter change

    def summary(self) -> str:
        text = f"merged {self.merged} adapted linears into their weights"
        if self.requantized:
            lost = torch.tensor(self.lost)
            text += (f"; {self.requantized} requantized: the rounding error is {lost.mean():.1%} of the adapter's "
                     f"change on average (worst layer {lost.max():.1%})")
        return text


@torch.no_grad()
def merge_adapters(model: nn.Module) -> MergeReport:
    """Replace every adapted linear by one plain (or re-quantized) linear computing the same thing."""
    report = MergeReport()
    model.eval()

    def make(name: str, layer: nn.Module) -> nn.Module | None:
        if not isinstance(layer, LoRALinear):
            return None
        report.merged += 1
        if isinstance(layer.base_layer, QuantLinear):
            return _requantized(layer, report)
        base = layer.base_layer
        base.weight = nn.Parameter(layer.merged_weight().to(base.weight.dtype), requires_grad=False)
        if name == "lm_head":  # the head no longer equals the embedding
            model.config.tie_word_embeddings = False
        return base

    swap_linears(model, make, (LoRALinear,))
    fuse_shared_inputs(model)
    return report


def _requantized(layer: LoRALinear, report: MergeReport) -> QuantLinear:
    base = layer.base_layer
    original, merged = base.dequantized(), layer.merged_weight()
    bias = None if base.bias is None else base.bias.float()
    if isinstance(base, Int8Linear):
        new = Int8Linear.from_codes(*quantize_int8(merged), bias)
    else:
        q = quantize_int4(merged, base.group_size)
        new = Int4Linear.from_codes(q.codes, q.scales, q.zeros, q.group_size, base.in_features, bias)
    change = (merged - original).norm()
    report.requantized += 1
    report.lost.append(float((new.dequantized() - merged).norm() / change) if change > 0 else 0.0)
    return new


def with_adapter_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose weights are the very same tensors (no memory for them),
    to wrap in another adapter: several adapters over one base held once. Scratch buffers and
    kernel caches are copied, so copies can run in different threads."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        kernel = getattr(module, "shared_kernel", None)
        if kernel is not None:
            shared.update({id(kernel.packed): kernel.packed, id(kernel.scale_offset): kernel.scale_offset})
    return copy.deepcopy(model, memo=shared)

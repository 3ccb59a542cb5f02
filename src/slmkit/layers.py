"""Drop-in replacements for `nn.Linear`, and the one function that swaps them into a model.

A replacement keeps the original `weight`/`bias` Parameters (so state-dict names, tied
embeddings and checkpoints are unchanged) and only changes how the product is computed. The
quantized linears live in `slmkit.quant.qlinear` and the LoRA/DoRA wrappers in
`slmkit.adapters.lora`; all of them are put in place by `swap_linears`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

UPCAST_MIN_ROWS = 4  # below this a bf16 GEMV is memory-bound and fastest as it is


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512_BF16 or AMX), where bf16 GEMMs are fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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

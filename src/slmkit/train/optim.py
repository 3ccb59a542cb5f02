"""AdamW with decay / no-decay parameter groups, and learning-rate schedules as pure functions.

A schedule is a function of the step alone, so a checkpoint restores it by restoring the step:
there is no scheduler object whose state could drift from the optimizer's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slmkit.errors import SlmError

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; biases and norm scales (1-D) do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise SlmError("the model has no trainable parameters")
    # The fused kernel does the whole update in one pass (CPU and CUDA) and is bitwise repeatable.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if schedule not in SCHEDULES:
        raise SlmError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    # warmup-stable-decay: constant until the last `decay_fraction` of training, then linear to min_lr
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return lr
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return lr + (min_lr - lr) * min(progress, 1.0)

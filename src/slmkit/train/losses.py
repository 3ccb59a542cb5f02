"""Training losses. A loss function takes (model, batch) and returns (loss, logs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmkit.data.sft_batches import IGNORE  # target value that contributes no loss (padding, prompt tokens)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V) in any dtype, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Causal language modelling: predict batch["targets"] from batch["input_ids"]."""
    return cross_entropy(model(batch["input_ids"]), batch["targets"]), {}


def masked_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Fine-tuning: cross-entropy on the trained targets only (answers, completions), with logits
    computed only at those positions; packed batches carry segment ids and per-document positions."""
    targets = batch["targets"]
    keep = targets != IGNORE  # (B, T)
    logits = model(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                   logits_to_keep=keep)  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep]), {}

"""Rough cost estimates for `--dry-run`: shapes on the `meta` device (no memory) and constants
measured on a 2-core AVX-512 machine (bench/results/): LoRA on SmolLM2-135M trains ~450 tokens/s
at 3.5 GiB peak (finetune.json), GPTQ takes ~240 s and RTN ~15 s (quantize.json), one
Symptom2Disease test row takes ~0.7 s to score (finetune.json). Rough by design: the point is
minutes vs hours and MiB vs GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmkit.config import ModelConfig
from slmkit.model import CausalLM

REFERENCE_PARAMS = 135e6  # SmolLM2-135M: the model the constants below were measured on
TRAIN_TOKENS_PER_S = 450.0
EVAL_ROW_S = 0.7  # a task row: log-likelihood of each label + a greedy answer
GENERAL_ROW_S = 0.15  # a multiple-choice row
GPTQ_S, RTN_S = 240.0, 15.0
DECODE_TOKENS_PER_S = 15.0  # fp32 decode, batch 1


@dataclass
class Estimate:
    seconds: float = 0.0
    disk_bytes: float = 0.0
    peak_bytes: float = 0.0
    note: str = ""


def meta_model(config: ModelConfig) -> CausalLM:
    """The model's modules without memory: enough to check widths, ranks and group sizes."""
    with torch.device("meta"):
        return CausalLM(config)


def params(config: ModelConfig) -> float:
    return float(sum(p.numel() for p in meta_model(config).parameters()))


def scale(config: ModelConfig) -> float:
    """How much bigger than the model the constants were measured on."""
    return params(config) / REFERENCE_PARAMS

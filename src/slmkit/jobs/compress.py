"""`slm quantize`, `slm prune` and `slm lowrank` as jobs: load the model whole (an adapter folded
into its base), read calibration text when the method needs it, compress, save a checkpoint.

Every setting is checked against the model's shapes before calibration text is read, so a bad
group size or sparsity fails in one line, not after minutes of calibration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from slmkit.adapters.lora import lora_layers
from slmkit.adapters.merge import merge_adapters
from slmkit.compress.lowrank import LowRankConfig, check_lowrank, factorize_model
from slmkit.compress.prune import PruneConfig, check_prune, prune_model
from slmkit.compress.quant.quantize import CALIBRATED, QuantConfig, quantize_model, targets
from slmkit.compress.structured import StructuredConfig, check_structured, prune_structured
from slmkit.config import ModelConfig
from slmkit.data.calibration import calibration_ids
from slmkit.errors import SlmError
from slmkit.interop.hf import save_checkpoint
from slmkit.load import Loaded, load


@dataclass
class QuantizeJob:
    model: str = ""
    """the MODEL to quantize: GGUF file, HF directory, adapter directory (merged first) or the bundled model"""
    out: str = field(default="", metadata={"flag": ("-o", "--out")})
    """output directory (a quantized HF-style checkpoint)"""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """how to quantize"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


@dataclass
class PruneJob:
    model: str = ""
    """the MODEL to prune"""
    out: str = field(default="", metadata={"flag": ("-o", "--out")})
    """output directory (an HF-style checkpoint)"""
    structured: bool = False
    """remove whole neurons, heads, channels or layers (the `shape` settings) instead of single weights"""
    sparse: PruneConfig = field(default_factory=PruneConfig)
    """unstructured / N:M pruning (zeros in place)"""
    shape: StructuredConfig = field(default_factory=StructuredConfig)
    """structured pruning (a smaller dense model)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


@dataclass
class LowRankJob:
    model: str = ""
    """the MODEL to factorize"""
    out: str = field(default="", metadata={"flag": ("-o", "--out")})
    """output directory (a factorized HF-style checkpoint)"""
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    """how to factorize"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


Log = Callable[[str], object]


def load_whole(spec: str, log: Log = print) -> Loaded:
    """MODEL in fp32 as one plain model: an adapter directory is merged into its base first (said)."""
    loaded = load(spec, dtype=torch.float32)
    if lora_layers(loaded.model):
        log(f"{merge_adapters(loaded.model).summary()} (for a separate llama.cpp adapter: slm export gguf-lora)")
    return loaded


def _require_out(job) -> None:
    if not job.model or not job.out:
        raise SlmError("give the MODEL to read and an output directory (-o OUT)")


def _threads(job) -> None:
    if job.threads:
        torch.set_num_threads(job.threads)


def _calibration(loaded: Loaded, calib: str | None, samples: int, seq_len: int, spec: str) -> torch.Tensor:
    if loaded.tokenizer is None:
        raise SlmError(f"'{spec}' has no tokenizer to read calibration text with; use a model directory "
                       "with tokenizer.json or a method that needs no calibration")
    return calibration_ids(loaded.tokenizer, calib, samples, seq_len, loaded.model.config.vocab_size)


def check_quantize(model: torch.nn.Module, job: QuantizeJob) -> None:
    """Every setting against the model's linears (widths, group size); also works on a meta model."""
    targets(model, job.quant)


def run_quantize(job: QuantizeJob, log: Log = print) -> str:
    """Quantize and save; returns the report's summary line."""
    _require_out(job)
    _threads(job)
    loaded = load_whole(job.model, log)
    started = time.perf_counter()
    q = job.quant
    ids = _calibration(loaded, q.calib, q.calib_samples, q.calib_seq_len, job.model) if q.method in CALIBRATED else None
    report = quantize_model(loaded.model, q, ids)  # checks every setting before any work
    out = save_checkpoint(loaded.model, loaded.tokenizer, job.out)
    log(report.summary())
    log(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return report.summary()


def check_pruning(model: torch.nn.Module, job: PruneJob) -> ModelConfig:
    """Every setting against the model's shapes; returns the architecture the pruned model will have
    (structured pruning shrinks it, unstructured keeps it)."""
    if job.structured:
        return check_structured(model, job.shape)
    check_prune(model, job.sparse)
    return model.config


def run_prune(job: PruneJob, log: Log = print) -> str:
    _require_out(job)
    _threads(job)
    loaded = load_whole(job.model, log)
    model, started = loaded.model, time.perf_counter()
    check_pruning(model, job)  # every setting checked before calibration is read
    if job.structured:
        s = job.shape
        model, report = prune_structured(model, s, _calibration(loaded, s.calib, s.calib_samples, s.calib_seq_len,
                                                                job.model))
    else:
        p = job.sparse
        ids = _calibration(loaded, p.calib, p.calib_samples, p.calib_seq_len, job.model) if p.calibrated else None
        report = prune_model(model, p, ids)
    out = save_checkpoint(model, loaded.tokenizer, job.out)
    log(report.summary())
    log(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return report.summary()


def run_lowrank(job: LowRankJob, log: Log = print) -> str:
    _require_out(job)
    _threads(job)
    loaded = load_whole(job.model, log)
    cfg, started = job.lowrank, time.perf_counter()
    check_lowrank(loaded.model, cfg)  # every setting checked before calibration text is read
    ids = _calibration(loaded, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, job.model) if cfg.calibrated else None
    report = factorize_model(loaded.model, cfg, ids)
    out = save_checkpoint(loaded.model, loaded.tokenizer, job.out)  # PATH.partial, renamed when complete
    log(report.summary())
    log(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return report.summary()

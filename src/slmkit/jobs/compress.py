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
from slmkit.data.calibration import calibration_ids, check_calibration
from slmkit.errors import SlmError
from slmkit.interop.hf import save_checkpoint
from slmkit.load import Loaded, load
from slmkit.runtime import use_threads


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


def _calibration(loaded: Loaded, calib: str | None, samples: int, seq_len: int, spec: str) -> torch.Tensor:
    if loaded.tokenizer is None:
        raise SlmError(f"'{spec}' has no tokenizer to read calibration text with; use a model directory "
                       "with tokenizer.json or a method that needs no calibration")
    return calibration_ids(loaded.tokenizer, calib, samples, seq_len, loaded.model.config.vocab_size)


def check_quantize(model: torch.nn.Module, job: QuantizeJob) -> None:
    """Every setting against the model's linears (widths, group size), and the calibration source
    where the method reads one; also works on a meta model."""
    targets(model, job.quant)
    if job.quant.method in CALIBRATED:
        check_calibration(job.quant.calib)


def run_quantize(job: QuantizeJob, log: Log = print) -> str:
    """Quantize and save; returns the report's summary line."""
    _require_out(job)
    q = job.quant
    if q.method in CALIBRATED:
        check_calibration(q.calib)  # before minutes of loading
    use_threads(job.threads)
    loaded = load_whole(job.model, log)
    started = time.perf_counter()
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
    use_threads(job.threads)
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
    use_threads(job.threads)
    loaded = load_whole(job.model, log)
    cfg, started = job.lowrank, time.perf_counter()
    check_lowrank(loaded.model, cfg)  # every setting checked before calibration text is read
    ids = _calibration(loaded, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, job.model) if cfg.calibrated else None
    report = factorize_model(loaded.model, cfg, ids)
    out = save_checkpoint(loaded.model, loaded.tokenizer, job.out)  # PATH.partial, renamed when complete
    log(report.summary())
    log(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return report.summary()


QUANTIZE_EXAMPLES = """examples:
  slm quantize smollm2-135m-instruct --method int8 -o runs/smollm2-int8
  slm quantize smollm2-135m-instruct --method gptq --group-size 64 -o runs/smollm2-gptq
  slm generate runs/smollm2-gptq "Once upon a time"
  slm export gguf runs/smollm2-int8 smollm2-q8.gguf --type q8_0
"""

PRUNE_NOTES = """\
Unstructured / N:M (zeros in place; same shape, same speed):
  magnitude   drop the smallest |W| in each row (the floor)
  wanda       drop the smallest |W| x ||X_j|| in each row (calibration activations, no update)
  sparsegpt   OBS saliency, and the remaining weights of each row updated to absorb the error
  Unstructured and 2:4 sparsity give NO CPU speed-up with PyTorch's dense kernels: use them for
  quality research or as a start for further compression. Speed comes from --structured.
  Fine-tuning and distillation of a pruned checkpoint keep its zeros at zero.

Structured (a smaller dense model of the same architecture; faster):
  --params 90M, or any of --ffn --heads --kv-heads --hidden --layers; importance from calibration
  activations (Minitron: MLP neurons, heads within GQA groups, hidden channels; layers by block
  influence, ShortGPT). Heal it with `slm distill` from the original: configs/distill/heal-*.yaml.

examples:
  slm prune smollm2-135m-instruct --method wanda --sparsity 0.5 -o runs/smollm2-wanda50
  slm prune smollm2-135m-instruct --method sparsegpt --pattern 2:4 -o runs/smollm2-sgpt24
  slm prune smollm2-135m-instruct --structured --params 95M -o runs/smollm2-95m
  slm distill --config configs/distill/heal-width.yaml
"""

LOWRANK_NOTES = """\
Each chosen linear W (N outputs, K inputs: N*K weights) becomes two thinner ones, up (N x r) @
down (r x K): r*(N+K) weights. They are smaller only below the break-even rank N*K/(N+K)
(576x576: 288; 1536x576: 419), so --keep is the share of each linear's parameters the pair keeps:
rank = floor(keep * N*K/(N+K)), and keep must be in (0, 1).

  svd        plain truncated SVD of W: no data needed
  whitened   SVD-LLM: the SVD of W S, where S S^T = X^T X of calibration inputs X, so the dropped
             singular values are exactly the output error; needs calibration text (--calib)
  --ranks sensitivity   the same parameter total, spread by measured output error per linear
                        (needs calibration text for either method; two calibration passes)

At --keep 0.8 SmolLM2-135M's WikiText-2 perplexity goes from 36 to ~134 with whitened and is
destroyed by plain svd: small models have little low-rank slack; heal by distillation (`slm distill`).

The checkpoint loads in slmkit (generate, chat, eval, serve, bench). transformers cannot load it
(its config says llama, its weights are factor pairs), and GGUF export needs --densify, which
multiplies the factors back (the original size again).

examples:
  slm lowrank smollm2-135m-instruct --method whitened --keep 0.8 -o runs/smollm2-svdllm80
  slm lowrank smollm2-135m-instruct --keep 0.9 --ranks sensitivity -o runs/smollm2-svdllm90s
  slm eval runs/smollm2-svdllm80 --perplexity ../shared/data/corpus/wikitext2/valid.txt
  slm export gguf runs/smollm2-svdllm80 smollm2-svdllm80.gguf --densify
"""

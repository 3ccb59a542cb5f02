"""THE training loop, shared by pretraining, distillation and fine-tuning.

A recipe builds a model, a batch source and a loss function and calls `train`. The loop owns
everything else: AdamW groups, the learning-rate schedule, gradient accumulation and clipping,
mixed precision, optional torch.compile, data parallelism (under torchrun), evaluation, early
stopping, checkpoints, exact resume, the progress bar, metrics.jsonl and the loss plot.

What it deliberately does not know: where batches come from (any object with
`batch(step, micro, rank) -> dict`) and what the loss is (`loss_fn(model, batch)`). A recipe whose
loss has trainable parts of its own (distillation's projections) passes them as `extra`: they are
optimized, averaged across ranks and checkpointed with the model, but not saved into it.
A pruned model (config section `pruning`) gets its zeros put back after every optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

from slmkit.compress.prune import keep_zeros, sparsity_masks
from slmkit.errors import SlmError
from slmkit.fileio import partial_dir, replace_dir, write_text
from slmkit.layers import cpu_has_native_bf16
from slmkit.train import dist
from slmkit.train.checkpoint import (
    HF_FILES,
    ModelFiles,
    TrainerState,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from slmkit.train.losses import IGNORE, lm_loss
from slmkit.train.optim import build_optimizer, lr_at
from slmkit.train.plot import plot_run
from slmkit.train.tracking import Trackers

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
# Settings that decide which windows and random numbers a step sees: a resume must keep them.
RESUME_KEYS = ("seed", "micro_batch_size", "grad_accum", "seq_len")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this)."""
    micro_batch_size: int = 8
    """Sequences per forward pass on each data-parallel rank."""
    grad_accum: int = 1
    """Forward passes per optimizer step (global batch = micro_batch_size x grad_accum x ranks)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine / decay phase."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    schedule: str = "cosine"
    """cosine, wsd (warmup-stable-decay) or constant."""
    decay_fraction: float = 0.2
    """wsd only: final share of the steps spent decaying to min_lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    precision: str = "auto"
    """fp32, bf16 (autocast) or auto: bf16 where the hardware has bf16 units, else fp32."""
    compile: bool = False
    """torch.compile the model (faster steps after a compile of a minute or two)."""
    compile_mode: str = "max-autotune-no-cudagraphs"
    """torch.compile mode; max-autotune lets Inductor fuse elementwise work into its GEMM kernels."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute its activations in the backward pass: a small model's activations shrink from ~1.5 MB to ~0.1 MB per token, for ~1/3 more compute."""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu or cuda."""
    seed: int = 1337
    """Seed of the data order and dropout (the model's init seed is the recipe's)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    eval_every: int = 100
    """Evaluate on the validation batches every N steps (0 = never)."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Step checkpoints to keep on disk (the best one is kept besides)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement (0 = never stop early)."""
    early_stopping_min_delta: float = 0.0
    """Smallest drop in validation loss that counts as an improvement."""
    time_limit_minutes: float = 0.0
    """Stop (with a checkpoint) after this much training time (0 = no limit)."""
    loggers: list[str] = field(default_factory=list)
    """Experiment trackers fed with metrics.jsonl's records, the settings and the final scores: tensorboard (RUN/tensorboard), mlflow (RUN/mlflow.db or $MLFLOW_TRACKING_URI), trackio (the [track] extra)."""


@dataclass
class TrainResult:
    state: TrainerState
    run_dir: Path
    stop_reason: str  # "steps", "early_stopping" or "time_limit"


def train(model: nn.Module, data, cfg: TrainConfig, run_dir: str | Path, tokenizer=None, *,
          loss_fn: LossFn = lm_loss, val_batches: list[dict] | None = None, resume: bool = False,
          extra: nn.Module | None = None, files: ModelFiles = HF_FILES, settings: dict | None = None,
          validate: Callable | None = None) -> TrainResult:
    """Train `model` (and `extra`) in place on `data.batch(step, micro, rank)`; see the module docstring.

    Only parameters with requires_grad train (an adapter over a frozen base); `files` says how
    checkpoints and RUN/final hold the model (a whole model, or only its adapter); `settings`: the
    whole recipe, for the trackers (default: the training settings); `validate(forward, model, amp,
    device) -> {"val_loss": ..., ...}` replaces the next-token validation loss (preference tuning
    validates on pairs: its loss, reward accuracy and margin)."""
    info = dist.setup(cfg.device)
    run = Path(run_dir)
    _check_run_dir(run, resume)
    model.to(info.device).train()
    if cfg.activation_checkpointing:
        recompute_blocks(model)
    masks = sparsity_masks(model)  # a pruned model keeps its zeros
    trainable = nn.ModuleList([model] + ([extra.to(info.device).train()] if extra is not None else []))
    opt = build_optimizer(trainable, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    state = _resume(run, model, opt, cfg, info, extra, files) if resume else _fresh(run, cfg, info)
    trackers = (Trackers(cfg.loggers, run, settings or {"train": asdict(cfg)}, state.step if resume else None)
                if info.is_main and cfg.loggers else None)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if info.world > 1 else model
    forward = torch.compile(wrapped, mode=cfg.compile_mode) if cfg.compile else wrapped
    amp = _autocast(cfg.precision, info.device)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="training", unit="step", disable=not info.is_main,
               dynamic_ncols=True, mininterval=1.0)
    started, stop_reason = time.perf_counter() - state.elapsed_seconds, "steps"
    while state.step < cfg.steps:
        tick = time.perf_counter()
        row = _step(forward, wrapped, trainable, opt, data, cfg, state.step, info, loss_fn, amp)
        keep_zeros(masks)
        state.step += 1
        tokens = row.pop("positions") * info.world  # what the model ran on: windows, or padded/packed examples
        state.tokens += tokens
        state.elapsed_seconds = time.perf_counter() - started
        row.update(step=state.step, tokens=state.tokens, tok_per_s=tokens / (time.perf_counter() - tick))
        if info.is_main and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
            _log(run, row, trackers)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_per_s']:.0f}")
        bar.update(1)
        improved = False
        if (val_batches or validate) and cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            scores = (validate(forward, model, amp, info.device) if validate is not None
                      else {"val_loss": evaluate(forward, model, val_batches, amp, info.device)})
            improved, stop = _evaluate_and_track(scores, state, cfg, run, info, trackers)
            stop_reason = "early_stopping" if stop else stop_reason
        if cfg.time_limit_minutes and dist.any_rank(state.elapsed_seconds > 60 * cfg.time_limit_minutes):
            stop_reason = "time_limit"
        stopping = stop_reason != "steps" or state.step == cfg.steps
        if improved or stopping or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            _checkpoint(run, state, model, opt, tokenizer, cfg, info, best=improved, extra=extra, files=files)
        if stop_reason != "steps":
            break
    bar.close()
    if info.is_main:
        final = partial_dir(run / "final")
        files.save(model, tokenizer, final)
        replace_dir(final, run / "final")
        _plot(run)
        if trackers is not None:
            trackers.finish({"steps": state.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
                             "best_step": state.best_step if state.best_val_loss is not None else None,
                             "last_val_loss": state.last_val_loss})
    dist.barrier()
    return TrainResult(state, run, stop_reason)


def recompute_blocks(model: nn.Module) -> None:
    """Activation checkpointing from outside the model: each block's forward, while training with
    gradients, runs under torch.utils.checkpoint (non-reentrant, so DDP and frozen inputs work; RNG
    state kept, so dropout recomputes the same mask). Inference and evaluation are untouched."""
    for block in model.model.layers:
        if getattr(block, "recomputed", False):
            continue
        inner = block.forward

        def forward(*args, inner=inner, block=block):
            if block.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False)
            return inner(*args)

        block.forward, block.recomputed = forward, True


# -- one optimizer step --------------------------------------------------------------------------


def _step(forward, wrapped, trainable, opt, data, cfg: TrainConfig, step: int, info, loss_fn, amp) -> dict:
    lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
               schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
    for group in opt.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=info.device)
    positions = 0
    logs: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(info.device) for k, v in data.batch(step, micro, info.rank).items()}
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or info.world == 1 else wrapped.no_sync()
        with sync:
            with amp:
                loss, logs = loss_fn(forward, batch)
            (loss / cfg.grad_accum).backward()
        total += loss.detach().float()
        positions += batch["input_ids"].numel()
    if len(trainable) > 1 and info.world > 1:  # DDP syncs the model's gradients, not the extras'
        dist.average_gradients(trainable[1])
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip or math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mean_loss = dist.all_reduce_sum(total / cfg.grad_accum).item() / info.world
    if not math.isfinite(mean_loss):
        raise SlmError(f"the loss became {mean_loss} at step {step + 1}; lower lr or enable grad_clip")
    return {"kind": "train", "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "positions": positions,
            **logs}


@torch.no_grad()
def evaluate(forward, model: nn.Module, batches: list[dict], amp=contextlib.nullcontext(),
             device=torch.device("cpu")) -> float:
    """Mean next-token loss over `batches` (summed over every rank's share)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    for batch in batches:
        targets = batch["targets"].to(device)
        keep = targets != IGNORE  # logits only where a target counts (fine-tuning: the answers)
        with amp:
            logits = forward(batch["input_ids"].to(device), logits_to_keep=keep)  # (N, V)
        losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        totals += torch.stack([losses.double(), keep.sum().double()])
    model.train()
    loss_sum, count = dist.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1)


def _evaluate_and_track(scores: dict[str, float], state: TrainerState, cfg: TrainConfig, run: Path, info,
                        trackers: Trackers | None = None):
    """Log a validation's scores, update best / early stopping (on val_loss). Returns (improved, should_stop)."""
    val = scores["val_loss"]
    state.last_val_loss = val
    improved = state.best_val_loss is None or val < state.best_val_loss - cfg.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val, state.step, 0
    else:
        state.evals_without_improvement += 1
    if info.is_main:
        # a next-token loss has a perplexity; a preference loss does not
        perplexity = {"val_ppl": math.exp(min(val, 50))} if set(scores) == {"val_loss"} else {}
        _log(run, {"kind": "eval", "step": state.step, **scores, **perplexity, "best_val_loss": state.best_val_loss},
             trackers)
        tqdm.write(f"step {state.step}: validation loss {val:.4f} (best {state.best_val_loss:.4f} "
                   f"at step {state.best_step})")
    patience = cfg.early_stopping_patience
    return improved, bool(patience and state.evals_without_improvement >= patience)


# -- run directory, resume, checkpoints ----------------------------------------------------------


def _check_run_dir(run: Path, resume: bool) -> None:
    has_checkpoint = (run / "last").is_symlink() or (run / "last").exists()
    if resume and not has_checkpoint:
        raise SlmError(f"nothing to resume: '{run}' has no checkpoint (RUN/last)")
    if not resume and has_checkpoint:
        raise SlmError(f"'{run}' already holds a run; pass --resume to continue it or choose another out=")


def _fresh(run: Path, cfg: TrainConfig, info) -> TrainerState:
    torch.manual_seed(cfg.seed + info.rank)  # this rank's dropout stream (weights were initialised before)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "metrics.jsonl", "")  # a new run starts its log empty
    return TrainerState()


def _resume(run: Path, model, opt, cfg: TrainConfig, info, extra=None, files: ModelFiles = HF_FILES) -> TrainerState:
    state, saved, rng_states = load_checkpoint(run / "last", model, opt, extra, files)
    saved_train, saved_world = saved.get("train", {}), saved.get("world", 1)
    problems = [f"{k} {saved_train[k]} -> {getattr(cfg, k)}" for k in RESUME_KEYS
                if k in saved_train and saved_train[k] != getattr(cfg, k)]
    if saved_world != info.world:
        problems.append(f"ranks {saved_world} -> {info.world}")
    if problems:
        raise SlmError(f"cannot resume exactly ({'; '.join(problems)}): keep those settings or start a new run")
    torch.set_rng_state(rng_states[info.rank])
    if info.is_main:
        truncate_metrics(run, state.step)
        tqdm.write(f"resuming {run} from step {state.step}")
    return state


def _checkpoint(run: Path, state, model, opt, tokenizer, cfg: TrainConfig, info, best: bool, extra=None,
                files: ModelFiles = HF_FILES) -> None:
    rng = dist.gather_rng_states()
    if info.is_main:
        save_checkpoint(run, state, model, opt, tokenizer, rng, {"train": asdict(cfg), "world": info.world},
                        best=best, keep=cfg.keep_checkpoints, extra=extra, files=files)
    dist.barrier()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run at `precision` computes its products in bf16 (autocast) on `device`."""
    if precision not in ("auto", "fp32", "bf16"):
        raise SlmError(f"precision must be auto, fp32 or bf16, not '{precision}'")
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_native_bf16()))


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def _log(run: Path, row: dict, trackers: Trackers | None = None) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if trackers is not None:
        trackers.log(row)


def _plot(run: Path) -> None:
    plot_run(run)

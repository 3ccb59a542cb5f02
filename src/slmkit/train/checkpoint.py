"""Checkpoints and the run directory: atomic writes, exact resume, loadable models.

    RUN/config.yaml             the resolved recipe config
    RUN/metrics.jsonl           one JSON line per logged step and per evaluation
    RUN/checkpoints/step-N/     a loadable HF-style model directory plus training state:
        model.safetensors, config.json, tokenizer.json   (what `slm generate` needs)
        optimizer.safetensors   AdamW moments and steps
        rng.safetensors         every rank's torch RNG state (dropout)
        trainer.json            step, tokens, best validation loss, early-stopping count, config
        extra.safetensors       trainable parts of the loss (distillation projections), if any
    RUN/last, RUN/best          symlinks to checkpoint directories, swapped atomically
    RUN/final/                  the model at the end of training

A checkpoint is written into `step-N.partial/` and moved into place (slmkit.fileio), so a crash leaves either the
old or the new checkpoint, never half of one. Everything is safetensors or JSON: no pickle.
The learning-rate schedule is a function of the step and the data order a function of (seed,
step), so restoring step, weights, optimizer moments and RNG states resumes a run exactly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.errors import SlmError
from slmkit.fileio import partial_dir, point, replace_dir, write_text, write_yaml
from slmkit.interop.hf import save_hf

REQUIRED = ("optimizer.safetensors", "rng.safetensors", "trainer.json")


@dataclass
class ModelFiles:
    """How a run writes its model into a directory and restores it on resume: a whole HF model
    (pretraining, distillation, full fine-tuning) or only the adapter (LoRA, DoRA, QLoRA)."""

    save: Callable[[nn.Module, object, Path], object]  # (model, tokenizer, directory)
    restore: Callable[[nn.Module, Path], None]  # load the saved trainable weights into the model
    required: tuple[str, ...]  # files a complete checkpoint has


def _save_hf(model, tokenizer, path: Path) -> None:
    save_hf(model, tokenizer, path)


def _restore_hf(model, path: Path) -> None:
    _load_weights(path, model, load_file(str(path / "model.safetensors")))


HF_FILES = ModelFiles(_save_hf, _restore_hf, ("model.safetensors", "config.json"))


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_seconds: float = 0.0
    last_val_loss: float | None = None  # the latest validation loss (the trackers' final score)


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run: Path, state: TrainerState, model, optimizer, tokenizer, rng_states: list[torch.Tensor],
                    config: dict, best: bool = False, keep: int = 2, extra=None, files: ModelFiles = HF_FILES) -> Path:
    """Write the checkpoint for `state.step` atomically and point RUN/last (and RUN/best) at it."""
    final = checkpoint_dir(run, state.step)
    tmp = partial_dir(final)
    files.save(model, tokenizer, tmp)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    save_file({f"rank{r}": s for r, s in enumerate(rng_states)}, str(tmp / "rng.safetensors"))
    if extra is not None:
        save_file({k: v.contiguous() for k, v in extra.state_dict().items()}, str(tmp / "extra.safetensors"))
    trainer = {"state": asdict(state), "param_groups": groups, "config": config}
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
    replace_dir(tmp, final)  # a re-run of the same step after a resume replaces it
    point(run / "last", final)
    if best:
        point(run / "best", final)
    _prune(run, keep)
    return final


def load_checkpoint(path: Path, model, optimizer, extra=None,
                    files: ModelFiles = HF_FILES) -> tuple[TrainerState, dict, list[torch.Tensor]]:
    """Restore weights (and `extra`) and optimizer in place; returns (state, saved config, per-rank RNG states)."""
    path = path.resolve()
    for name in files.required + REQUIRED + (("extra.safetensors",) if extra is not None else ()):
        if not (path / name).is_file():
            raise _corrupt(path, f"{name} is missing")
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        state = TrainerState(**trainer["state"])
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        if extra is not None:
            extra.load_state_dict(load_file(str(path / "extra.safetensors")))
        files.restore(model, path)
    except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, OSError, RuntimeError) as err:
        raise _corrupt(path, str(err)) from err
    try:
        optimizer.load_state_dict(_optimizer_state(opt_tensors, trainer["param_groups"]))
    except (ValueError, KeyError) as err:
        raise _corrupt(path, f"optimizer state does not fit this model: {err}") from err
    return state, trainer.get("config", {}), [rng[f"rank{r}"] for r in range(len(rng))]


def _corrupt(path: Path, why: str) -> SlmError:
    return SlmError(f"checkpoint '{path}' is corrupt: {why}. Remove it to resume from an earlier checkpoint, "
                    "or start a new run in another directory")


def _load_weights(path: Path, model, weights: dict) -> None:
    tied = model.config.tie_word_embeddings
    own = model.state_dict()
    expected = {k for k in own if not (tied and k == "lm_head.weight")}
    if set(weights) != expected:
        raise _corrupt(path, f"model weights do not match the architecture ({len(weights)} vs {len(expected)} tensors)")
    with torch.no_grad():
        for name, tensor in weights.items():
            if own[name].shape != tensor.shape:
                raise _corrupt(path, f"{name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
            own[name].copy_(tensor)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
    return tensors, state["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": groups}


def _prune(run: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the ones RUN/last or RUN/best point to."""
    protected = {(run / name).resolve() for name in ("last", "best") if (run / name).is_symlink()}
    steps = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.suffix not in (".partial", ".old"))
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() not in protected:
            shutil.rmtree(old)


def write_run_config(run: str | Path, config: dict) -> None:
    """RUN/config.yaml for a new run: the resolved config (a resumed run keeps the one it began with)."""
    run = Path(run)
    if not (run / "last").exists():
        run.mkdir(parents=True, exist_ok=True)
        write_yaml(run / "config.yaml", config)


def truncate_metrics(run: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they are redone after a resume)."""
    file = run / "metrics.jsonl"
    if not file.is_file():
        return
    lines = [line for line in file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(file, "".join(line + "\n" for line in lines))

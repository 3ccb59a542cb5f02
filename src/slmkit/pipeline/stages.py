"""The stages: each turns its section of the recipe into the command's own config (the joining
paths filled in) and runs the command's own function. Nothing here re-implements a step.

`resolve_*` builds a stage's config without doing work (for fingerprints and `--dry-run`);
`run_*` does the work and returns what later stages and the report read (`outputs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmkit.config import to_dict
from slmkit.data.prepare import PrepareConfig, prepare
from slmkit.jobs.compress import run_lowrank, run_prune, run_quantize
from slmkit.pipeline.config import STAGES, PipelineConfig
from slmkit.train.distill import run as run_distill
from slmkit.train.finetune import run as run_finetune

# Stages whose output is a model: each gets a row in the evaluation and the report.
MODEL_STAGES = ("base", "prune", "lowrank", "distill", "finetune", "quantize")
TRAINING_STAGES = ("distill", "finetune")


@dataclass
class Flow:
    """What the stages so far have produced: the current model, prepared data, each model stage's
    output and fingerprint (in order)."""

    cfg: PipelineConfig
    raw: dict
    root: Path
    model: str = ""
    data: str | None = None
    models: dict[str, str] = field(default_factory=dict)  # stage kind -> model path
    fingerprints: dict[str, str] = field(default_factory=dict)  # stage kind -> fingerprint
    curves: dict[str, Path] = field(default_factory=dict)  # stage dir name -> training run dir
    finetune_dir: str | None = None  # the fine-tuning run (an adapter directory for lora/dora/qlora)

    def stage_dir(self, kind: str) -> Path:
        return self.root / stage_name(kind)

    def written(self, kind: str, key: str) -> bool:
        """Whether the recipe itself sets `key` in section `kind` (as opposed to a default)."""
        section = self.raw.get(kind)
        return isinstance(section, dict) and key in section


def stage_name(kind: str) -> str:
    return f"{STAGES.index(kind) + 1:02d}-{kind}"


def resolve(kind: str, flow: Flow) -> Any:
    """The command config stage `kind` runs with, its joining paths set from `flow`."""
    return RESOLVERS[kind](flow, flow.stage_dir(kind))


def _resolve_base(flow: Flow, _dir: Path):
    return flow.cfg.base


def _resolve_prepare(flow: Flow, dir: Path) -> PrepareConfig:
    cfg = flow.cfg.prepare
    tokenizer = cfg.tokenizer if flow.written("prepare", "tokenizer") else flow.cfg.base.model  # the teacher's
    return dataclasses.replace(cfg, out=str(dir / "data"), tokenizer=tokenizer)


def _resolve_model_job(kind: str):
    def resolve_job(flow: Flow, dir: Path):
        return dataclasses.replace(getattr(flow.cfg, kind), model=flow.model, out=str(dir / "model"))
    return resolve_job


def _resolve_distill(flow: Flow, dir: Path):
    cfg = flow.cfg.distill
    teacher = cfg.teacher if flow.written("distill", "teacher") else flow.cfg.base.model
    # after pruning or factorizing, distillation heals that model; otherwise it trains a new student
    # of the recipe's `model` shape
    healed = any(k in flow.models for k in ("prune", "lowrank"))
    data = cfg.data if flow.written("distill", "data") else (flow.data or cfg.data)
    return dataclasses.replace(cfg, teacher=teacher, student=flow.model if healed else "", data=data, out=str(dir))


def _resolve_finetune(flow: Flow, dir: Path):
    return dataclasses.replace(flow.cfg.finetune, base=flow.model, out=str(dir))


RESOLVERS: dict[str, Callable[[Flow, Path], Any]] = {
    "base": _resolve_base, "prepare": _resolve_prepare, "prune": _resolve_model_job("prune"),
    "lowrank": _resolve_model_job("lowrank"), "distill": _resolve_distill, "finetune": _resolve_finetune,
    "quantize": _resolve_model_job("quantize"),
}


def predicted_outputs(kind: str, config: Any) -> dict:
    """Where stage `kind` leaves its result, known from its config before it runs (the dry run's
    fingerprints of later stages depend on these paths, exactly as the real run's do)."""
    if kind == "base":
        return {"model": config.model}
    if kind == "prepare":
        return {"data": config.out}
    if kind in ("prune", "lowrank", "quantize"):
        return {"model": config.out}
    if kind == "distill":
        return {"model": str(Path(config.out) / "final"), "run_dir": config.out}
    if kind == "finetune":
        return {"model": config.out, "run_dir": config.out}
    return {}


def run_stage(kind: str, config: Any, dir: Path, resume: bool, log: Callable[[str], object]) -> dict:
    """Do stage `kind`'s work with its resolved config; returns its outputs (JSON-able)."""
    outputs = predicted_outputs(kind, config)
    if kind == "prepare":
        prepare(config, log=log)
    elif kind in ("prune", "lowrank", "quantize"):
        outputs["summary"] = {"prune": run_prune, "lowrank": run_lowrank, "quantize": run_quantize}[kind](config, log)
    elif kind in TRAINING_STAGES:
        result = (run_distill if kind == "distill" else run_finetune)(config, resume=resume)
        outputs.update(stop=result.stop_reason, steps=result.state.step, best_val_loss=result.state.best_val_loss)
    return outputs


def advance(flow: Flow, kind: str, fp: str, outputs: dict) -> None:
    """Record a finished stage's outputs in the flow (for the stages after it)."""
    flow.fingerprints[kind] = fp
    if "data" in outputs:
        flow.data = outputs["data"]
    if kind in MODEL_STAGES:
        flow.model = outputs["model"]
        flow.models[kind] = outputs["model"]
    if kind in TRAINING_STAGES:
        flow.curves[stage_name(kind)] = Path(outputs["run_dir"])
    if kind == "finetune":
        flow.finetune_dir = outputs["run_dir"]


def config_dict(config: Any) -> dict:
    return to_dict(config) if dataclasses.is_dataclass(config) else dict(config)

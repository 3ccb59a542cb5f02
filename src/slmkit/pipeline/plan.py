"""`--dry-run`, and the check every run starts with: each stage's config is resolved and checked
against the model shape it will see (predicted through pruning and distillation on the `meta`
device, no weights), its input files and task data are looked up, and a rough time, disk and
peak-memory estimate is made. Any problem is one line, before the first stage does work.

The estimates scale measurements made on a 2-core AVX-512 machine (bench/results/): LoRA on
SmolLM2-135M trains ~450 tokens/s at 3.5 GiB peak (finetune.json), GPTQ takes ~240 s and RTN ~15 s
(quantize.json), one Symptom2Disease test row takes ~0.7 s to score (finetune.json). They are rough
by design: the point is minutes vs hours and MiB vs GiB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from slmkit.adapters.lora import LoraConfig, check_rank, resolve_targets
from slmkit.compress.lowrank import check_lowrank
from slmkit.compress.quant.quantize import targets
from slmkit.config import ModelConfig, to_dict
from slmkit.data.prepare import PrepareConfig
from slmkit.data.readers import expand_inputs
from slmkit.data.tasks import finetune_examples
from slmkit.errors import SlmError
from slmkit.evals.api import default_data_dir
from slmkit.evals.tasks import make_task
from slmkit.interop.gguf import check_exportable
from slmkit.interop.gguf_quants import BITS
from slmkit.jobs.compress import check_pruning, check_quantize
from slmkit.jobs.export import check_gguf
from slmkit.load import inspect
from slmkit.model import CausalLM
from slmkit.pipeline.measure import task_of
from slmkit.pipeline.recipe import Recipe
from slmkit.pipeline.stages import Flow, advance, config_dict, predicted_outputs, resolve, stage_name
from slmkit.pipeline.state import StageDir, fingerprint
from slmkit.sizing import human_bytes
from slmkit.train.finetune import METHODS

REFERENCE_PARAMS = 135e6  # SmolLM2-135M: the model the constants below were measured on
TRAIN_TOKENS_PER_S = 450.0
EVAL_ROW_S = 0.7  # a task row: log-likelihood of each label + a greedy answer
GENERAL_ROW_S = 0.15  # a multiple-choice row
GPTQ_S, RTN_S = 240.0, 15.0
DECODE_TOKENS_PER_S = 15.0  # fp32 decode, batch 1


@dataclass
class Step:
    kind: str
    config: Any
    fingerprint: str
    up_to_date: bool
    seconds: float
    disk_bytes: float
    peak_bytes: float
    note: str = ""


def check(recipe: Recipe, kinds: list[str]) -> list[Step]:
    """Resolve and check every stage in order; returns the plan (refuses bad input in one line)."""
    flow = Flow(recipe.cfg, recipe.raw, recipe.root)
    shape = _base_shape(recipe.cfg.base.model)
    steps = []
    for kind in kinds:
        config = stage_config(kind, recipe, flow)
        estimate, shape = CHECKS[kind](config, shape, flow)
        fp = fingerprint(kind, config_dict(config), list(flow.fingerprints.values()), recipe.root)
        steps.append(Step(kind, config, fp, StageDir(flow.stage_dir(kind)).is_done(fp), *estimate))
        advance(flow, kind, fp, predicted_outputs(kind, config))
    return steps


def stage_config(kind: str, recipe: Recipe, flow: Flow) -> Any:
    """The stage's resolved config; evaluate and export also depend on which models exist and the task."""
    if kind == "evaluate":
        return {"evaluate": config_dict(recipe.cfg.evaluate), "task": pipeline_task(recipe),
                "models": dict(flow.models)}
    if kind == "export":
        return {"export": config_dict(recipe.cfg.export), "final": flow.model, "finetune": flow.finetune_dir,
                "task": pipeline_task(recipe), "card": recipe.text}
    if kind == "serve":
        return config_dict(recipe.cfg.serve)
    return resolve(kind, flow)


def pipeline_task(recipe: Recipe) -> str | None:
    finetune, evaluate = recipe.cfg.finetune, recipe.cfg.evaluate
    return task_of(evaluate, finetune.data.task if finetune else None) if evaluate else None


# -- shapes -------------------------------------------------------------------------------------

def _base_shape(spec: str) -> ModelConfig:
    return inspect(spec).config  # a missing file or unknown name fails here, with the close names


def _meta(config: ModelConfig) -> CausalLM:
    """The model's modules without memory: enough to check widths, ranks and group sizes."""
    with torch.device("meta"):
        return CausalLM(config)


def _params(config: ModelConfig) -> float:
    return float(sum(p.numel() for p in _meta(config).parameters()))


def _scale(config: ModelConfig) -> float:
    return _params(config) / REFERENCE_PARAMS


# -- per-stage checks: (config, shape so far, flow) -> ((seconds, disk, peak, note), shape after) --

def _check_base(config, shape: ModelConfig, _flow):
    return (0.0, 0.0, 4 * _params(shape), f"{_params(shape) / 1e6:.1f}M parameters"), shape


def _check_prepare(config: PrepareConfig, shape: ModelConfig, _flow):
    files = expand_inputs(config.inputs)  # missing inputs fail here
    size = sum(f.stat().st_size for f in files)
    return (size / 2e6, size, 2 * size + 2**30, f"{len(files)} files, {human_bytes(size)}"), shape


def _check_prune(job, shape: ModelConfig, _flow):
    after = check_pruning(_meta(shape), job)
    seconds = 60 * _scale(shape) + 30
    return (seconds, 4 * _params(after), 6 * _params(shape), f"{_params(after) / 1e6:.1f}M parameters after"), after


def _check_lowrank(job, shape: ModelConfig, _flow):
    check_lowrank(_meta(shape), job.lowrank)
    return (120 * _scale(shape), 4 * _params(shape) * job.lowrank.keep, 6 * _params(shape), ""), shape


def _check_distill(cfg, shape: ModelConfig, flow: Flow):
    teacher = _base_shape(cfg.teacher)
    if not cfg.data:
        raise SlmError("distill needs prepared data: give distill.data (a `slm prepare` directory) or a prepare stage")
    if "prepare" not in flow.raw and not Path(cfg.data).exists():
        raise SlmError(f"distill.data '{cfg.data}' does not exist; prepare it (`slm prepare`) or add a prepare stage")
    student = shape if cfg.student else dataclasses.replace(
        cfg.model, vocab_size=cfg.model.vocab_size or teacher.vocab_size)
    t = cfg.train
    tokens = t.steps * t.micro_batch_size * t.grad_accum * t.seq_len
    per_token = (6 * _params(student) + 2 * _params(teacher)) / (4 * REFERENCE_PARAMS * TRAIN_TOKENS_PER_S)
    peak = 16 * _params(student) + 4 * _params(teacher) + 2**30
    return (tokens * per_token, 3 * 4 * _params(student), peak, f"{t.steps} steps, {tokens:,} tokens"), student


def _check_finetune(cfg, shape: ModelConfig, _flow):
    if cfg.method not in METHODS:
        raise SlmError(f"unknown fine-tuning method '{cfg.method}' (choose from {', '.join(METHODS)})")
    train, val = finetune_examples(cfg.data)  # an unknown task or missing data fails here
    model = _meta(shape)
    if cfg.method != "full":
        lora = LoraConfig(**to_dict(cfg.lora))
        check_rank(model, resolve_targets(model, lora.targets), lora.r)
    if cfg.method == "qlora":
        targets(model, cfg.quant)
    t = cfg.train
    steps = max(1, math.ceil(cfg.epochs * len(train) / (t.micro_batch_size * t.grad_accum))) if cfg.epochs else t.steps
    tokens = steps * t.micro_batch_size * t.grad_accum * min(t.seq_len, 128)  # task rows are short
    disk = 4 * _params(shape) * (3 if cfg.method == "full" else 0.1)
    return ((tokens / TRAIN_TOKENS_PER_S) * _scale(shape), disk, 26 * _params(shape),
            f"{len(train)} train / {len(val)} validation rows, ~{steps} steps"), shape


def _check_quantize(job, shape: ModelConfig, _flow):
    check_quantize(_meta(shape), job)
    seconds = (GPTQ_S if job.quant.method in ("gptq", "awq") else RTN_S) * _scale(shape)
    bits = 8 if job.quant.method == "int8" else 4.5
    return (seconds, _params(shape) * bits / 8, 3 * 4 * _params(shape), job.quant.method), shape


def _check_evaluate(config: dict, shape: ModelConfig, flow: Flow):
    stage = flow.cfg.evaluate
    data_dir = stage.eval.data_dir or default_data_dir()
    rows = 0.0
    for name in ([config["task"]] if config["task"] else []) + list(stage.general):
        task = make_task(name, data_dir)  # unknown names fail here
        docs = len(task.eval_docs().rows)  # missing data fails here
        limit = stage.task_limit if name == config["task"] else stage.general_limit
        rows += min(docs, limit or docs) * (EVAL_ROW_S if name == config["task"] else GENERAL_ROW_S)
    b, bench_s = stage.bench, 0.0
    if b is not None:
        if b.prompt_tokens + b.new_tokens > shape.max_position_embeddings:
            raise SlmError(f"evaluate.bench: {b.prompt_tokens} + {b.new_tokens} tokens exceed the model's "
                           f"{shape.max_position_embeddings}-token context")
        bench_s = 15 + (b.runs + 1) * b.new_tokens / DECODE_TOKENS_PER_S * _scale(shape)
    models = len(config["models"])
    return ((rows * _scale(shape) + bench_s) * models, 0.0, 4 * _params(shape) + 2**30,
            f"{models} models"), shape


def _check_export(config: dict, shape: ModelConfig, _flow):
    cfg = _flow.cfg.export
    check_gguf(dataclasses.replace(cfg.gguf, model="final", out="final.gguf"))
    check_gguf(dataclasses.replace(cfg.gguf, model="base", type=cfg.adapter_base_type, out="base.gguf"))
    check_exportable(shape)
    bits = BITS[cfg.gguf.type]
    disk = _params(shape) * (bits / 8 + (4 if cfg.hf else 0))
    return (60 * _scale(shape) + (200 if cfg.check else 0) * _scale(shape), disk, 3 * 4 * _params(shape),
            cfg.gguf.type), shape


def _check_serve(config, shape: ModelConfig, _flow):
    return (0.0, 0.0, 4 * _params(shape), "prints the command (or starts it with --serve)"), shape


CHECKS: dict[str, Callable] = {
    "base": _check_base, "prepare": _check_prepare, "prune": _check_prune, "lowrank": _check_lowrank,
    "distill": _check_distill, "finetune": _check_finetune, "quantize": _check_quantize,
    "evaluate": _check_evaluate, "export": _check_export, "serve": _check_serve,
}


def show(recipe: Recipe, steps: list[Step], log: Callable[[str], object]) -> None:
    table = Table(title=f"pipeline {recipe.cfg.name} -> {recipe.root} (rough estimates for this machine class)")
    for column in ("stage", "status", "time", "disk", "peak memory", "what"):
        table.add_column(column, justify="right" if column in ("time", "disk", "peak memory") else "left")
    for s in steps:
        status = "prints" if s.kind == "serve" else "up to date" if s.up_to_date else "will run"
        table.add_row(stage_name(s.kind), status,
                      "-" if s.up_to_date else _minutes(s.seconds), human_bytes(s.disk_bytes),
                      human_bytes(s.peak_bytes), s.note)
    Console().print(table)
    todo = [s for s in steps if not s.up_to_date and s.kind != "serve"]
    log(f"{len(todo)} of {len(steps)} stages would run, ~{_minutes(sum(s.seconds for s in todo))} in all")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min"

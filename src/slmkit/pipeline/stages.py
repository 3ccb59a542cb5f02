"""The stages: one class per kind, each the whole of what the pipeline knows of it -- its recipe
section, the fields the pipeline joins, how its command config is resolved, checked and estimated
(the dry run), run, what it leaves for the stages after it, and its report rows. `STAGES` lists
them in the order they run; plan.py and run.py only loop over it. Each runs the command's own
function: nothing here re-implements a step.

Adding a stage is one class here (and its section in config.py's PipelineConfig).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmkit.compress.lowrank import check_lowrank
from slmkit.config import ModelConfig
from slmkit.data.prepare import PrepareConfig, prepare
from slmkit.data.readers import expand_inputs
from slmkit.errors import SlmError
from slmkit.evals.api import default_data_dir
from slmkit.evals.tasks import make_task
from slmkit.evals.tasks.userfile import user_task
from slmkit.interop.gguf import check_exportable
from slmkit.interop.gguf_quants import BITS
from slmkit.jobs.compress import check_pruning, check_quantize, run_lowrank, run_prune, run_quantize
from slmkit.jobs.export import check_gguf
from slmkit.load import inspect
from slmkit.pipeline import deploy, estimate
from slmkit.pipeline.config import EvaluateStage, ExportStage, Recipe
from slmkit.pipeline.estimate import Estimate, meta_model, params, scale
from slmkit.pipeline.measure import evaluate_models
from slmkit.sizing import human_bytes
from slmkit.train.adapt import check_finetune
from slmkit.train.distill import run as run_distill
from slmkit.train.finetune import run as run_finetune

Log = Callable[[str], object]


@dataclass
class Flow(Recipe):
    """A recipe on its way through the stages: what those so far have produced -- the current model,
    prepared data, each model stage's output and fingerprint (in order)."""

    model: str = ""
    data: str | None = None
    models: dict[str, str] = field(default_factory=dict)  # stage kind -> model path
    fingerprints: dict[str, str] = field(default_factory=dict)  # stage kind -> fingerprint
    curves: dict[str, Path] = field(default_factory=dict)  # stage dir name -> training run dir
    finetune_dir: str | None = None  # the fine-tuning run (an adapter directory for lora/dora/qlora)

    @classmethod
    def start(cls, recipe: Recipe) -> Flow:
        return cls(recipe.cfg, recipe.raw, recipe.text)

    def stage_dir(self, kind: str) -> Path:
        return self.root / stage_name(kind)

    def task(self) -> str | None:
        """The task the evaluation leads with: the recipe's, else the fine-tuning task."""
        finetune, evaluate = self.cfg.finetune, self.cfg.evaluate
        if evaluate and evaluate.data:
            return f"file:{Path(evaluate.data).name}"  # the name `slm eval --data` gives the file's task
        return (evaluate.task or (finetune.data.task if finetune else None) or None) if evaluate else None


@dataclass
class Work:
    """What a running stage gets besides its config."""

    dir: Path
    resume: bool
    log: Log


class Stage:
    """A stage kind. `resolve` gives the config it runs with (dataclasses only: it is fingerprinted),
    `check` refuses bad settings and estimates the cost on the model shape it will see, `outputs`
    says where its result will be before it runs, `run` does the work."""

    kind = ""
    joined: tuple[str, ...] = ()  # fields of its section the pipeline sets (a recipe may not), dotted
    joins = "it joins the stage to the one before it"  # why, in the refusal
    makes_model = False  # a model of its own: a row in the evaluation and the report
    trains = False  # a training run: resumes after a kill, draws curves

    def resolve(self, flow: Flow) -> Any:
        return getattr(flow.cfg, self.kind)

    def check(self, config: Any, shape: ModelConfig, flow: Flow) -> tuple[Estimate, ModelConfig]:
        return Estimate(), shape

    def outputs(self, config: Any) -> dict:
        return {}

    def run(self, config: Any, flow: Flow, work: Work) -> dict:
        return self.outputs(config)


class Base(Stage):
    kind, makes_model = "base", True

    def check(self, config, shape, flow):
        return Estimate(0.0, 0.0, 4 * params(shape), f"{params(shape) / 1e6:.1f}M parameters"), shape

    def outputs(self, config):
        return {"model": config.model}


class Prepare(Stage):
    kind, joined = "prepare", ("out",)

    def resolve(self, flow):
        cfg = flow.cfg.prepare
        tokenizer = cfg.tokenizer if flow.written("prepare", "tokenizer") else flow.cfg.base.model  # the teacher's
        return dataclasses.replace(cfg, out=str(flow.stage_dir(self.kind) / "data"), tokenizer=tokenizer)

    def check(self, config: PrepareConfig, shape, flow):
        files = expand_inputs(config.inputs)  # missing inputs fail here
        size = sum(f.stat().st_size for f in files)
        return Estimate(size / 2e6, size, 2 * size + 2**30, f"{len(files)} files, {human_bytes(size)}"), shape

    def outputs(self, config):
        return {"data": config.out}

    def run(self, config, flow, work):
        prepare(config, log=work.log)
        return self.outputs(config)


class ModelJob(Stage):
    """A compression command that reads the current model and writes a new one."""

    joined, makes_model = ("model", "out"), True
    job: Callable = None

    def resolve(self, flow):
        return dataclasses.replace(getattr(flow.cfg, self.kind), model=flow.model,
                                   out=str(flow.stage_dir(self.kind) / "model"))

    def outputs(self, config):
        return {"model": config.out}

    def run(self, config, flow, work):
        return {**self.outputs(config), "summary": type(self).job(config, work.log)}


class Prune(ModelJob):
    kind, job = "prune", run_prune

    def check(self, job, shape, flow):
        after = check_pruning(meta_model(shape), job)
        return Estimate(60 * scale(shape) + 30, 4 * params(after), 6 * params(shape),
                        f"{params(after) / 1e6:.1f}M parameters after"), after


class LowRank(ModelJob):
    kind, job = "lowrank", run_lowrank

    def check(self, job, shape, flow):
        check_lowrank(meta_model(shape), job.lowrank)
        return Estimate(120 * scale(shape), 4 * params(shape) * job.lowrank.keep, 6 * params(shape)), shape


class Quantize(ModelJob):
    kind, job = "quantize", run_quantize

    def check(self, job, shape, flow):
        check_quantize(meta_model(shape), job)
        seconds = (estimate.GPTQ_S if job.quant.method in ("gptq", "awq") else estimate.RTN_S) * scale(shape)
        bits = 8 if job.quant.method == "int8" else 4.5
        return Estimate(seconds, params(shape) * bits / 8, 3 * 4 * params(shape), job.quant.method), shape


class Distill(Stage):
    kind, joined, makes_model, trains = "distill", ("student", "out", "resume"), True, True

    def resolve(self, flow):
        cfg = flow.cfg.distill
        teacher = cfg.teacher if flow.written("distill", "teacher") else flow.cfg.base.model
        # after pruning or factorizing, distillation heals that model; otherwise it trains a new
        # student of the recipe's `model` shape
        healed = any(k in flow.models for k in ("prune", "lowrank"))
        data = cfg.data if flow.written("distill", "data") else (flow.data or cfg.data)
        return dataclasses.replace(cfg, teacher=teacher, student=flow.model if healed else "", data=data,
                                   out=str(flow.stage_dir(self.kind)))

    def check(self, cfg, shape, flow):
        teacher = inspect(cfg.teacher).config
        if not cfg.data:
            raise SlmError("distill needs prepared data: give distill.data (a `slm prepare` directory) or a "
                           "prepare stage")
        if "prepare" not in flow.raw and not Path(cfg.data).exists():
            raise SlmError(f"distill.data '{cfg.data}' does not exist; prepare it (`slm prepare`) or add a "
                           "prepare stage")
        student = shape if cfg.student else dataclasses.replace(
            cfg.model, vocab_size=cfg.model.vocab_size or teacher.vocab_size)
        t = cfg.train
        tokens = t.steps * t.micro_batch_size * t.grad_accum * t.seq_len
        per_token = (6 * params(student) + 2 * params(teacher)) / (
            4 * estimate.REFERENCE_PARAMS * estimate.TRAIN_TOKENS_PER_S)
        peak = 16 * params(student) + 4 * params(teacher) + 2**30
        note = f"{t.steps} steps, {tokens:,} tokens"
        return Estimate(tokens * per_token, 3 * 4 * params(student), peak, note), student

    def outputs(self, config):
        return {"model": str(Path(config.out) / "final"), "run_dir": config.out}

    def run(self, config, flow, work):
        result = run_distill(config, resume=work.resume)
        return {**self.outputs(config), **_trained(result)}


class Finetune(Stage):
    kind, joined, makes_model, trains = "finetune", ("base", "out", "resume"), True, True

    def resolve(self, flow):
        return dataclasses.replace(flow.cfg.finetune, base=flow.model, out=str(flow.stage_dir(self.kind)))

    def check(self, cfg, shape, flow):
        train, val = check_finetune(cfg, meta_model(shape))
        t = cfg.train
        steps = (max(1, math.ceil(cfg.epochs * len(train) / (t.micro_batch_size * t.grad_accum)))
                 if cfg.epochs else t.steps)
        tokens = steps * t.micro_batch_size * t.grad_accum * min(t.seq_len, 128)  # task rows are short
        disk = 4 * params(shape) * (3 if cfg.method == "full" else 0.1)
        return Estimate((tokens / estimate.TRAIN_TOKENS_PER_S) * scale(shape), disk, 26 * params(shape),
                        f"{len(train)} train / {len(val)} validation rows, ~{steps} steps"), shape

    def outputs(self, config):
        return {"model": config.out, "run_dir": config.out}

    def run(self, config, flow, work):
        result = run_finetune(config, resume=work.resume)
        return {**self.outputs(config), **_trained(result)}


def _trained(result) -> dict:
    return {"stop": result.stop_reason, "steps": result.state.step, "best_val_loss": result.state.best_val_loss}


@dataclass
class EvaluateRun:
    """The evaluate stage's config: its section, the task it leads with, and the models it scores."""

    evaluate: EvaluateStage
    task: str | None
    models: dict[str, str]


class Evaluate(Stage):
    kind = "evaluate"
    joined = tuple(f"eval.{k}" for k in ("model", "tasks", "limit", "output", "perplexity", "endpoint", "data",
                                         "train_data"))
    joins = "for each stage's model; choose tasks with evaluate.task/general and limits with task_limit/general_limit"

    def resolve(self, flow):
        chosen = flow.cfg.evaluate.stages
        models = {k: m for k, m in flow.models.items() if chosen is None or k in chosen}
        stage, finetune = flow.cfg.evaluate, flow.cfg.finetune
        if stage.data and finetune and finetune.data.train:  # the labels the model was trained on
            stage = dataclasses.replace(stage, eval=dataclasses.replace(stage.eval, train_data=finetune.data.train))
        return EvaluateRun(stage, flow.task(), models)

    def check(self, config: EvaluateRun, shape, flow):
        stage = config.evaluate
        missing = [k for k in stage.stages or [] if k not in flow.models]
        if missing:
            raise SlmError(f"evaluate.stages names {', '.join(missing)}, which made no model in this recipe; "
                           f"choose from {', '.join(flow.models) or 'none'}")
        data_dir = stage.eval.data_dir or (default_data_dir() if stage.general or not stage.data else None)
        rows = 0.0
        for name in ([config.task] if config.task else []) + list(stage.general):
            if name == config.task and stage.data:  # the user's rows: read and checked here, before any stage runs
                task = user_task(stage.data, stage.eval.data_kind, stage.eval.train_data, stage.eval.data_max_tokens)
            else:
                task = make_task(name, data_dir)  # unknown names and missing data fail here
            docs = len(task.eval_docs().rows)
            limit = stage.task_limit if name == config.task else stage.general_limit
            rows += min(docs, limit or docs) * (estimate.EVAL_ROW_S if name == config.task else estimate.GENERAL_ROW_S)
        b, bench_s = stage.bench, 0.0
        if b is not None:
            b.check(shape.max_position_embeddings, "evaluate.bench")
            bench_s = 15 + (b.runs + 1) * b.new_tokens / estimate.DECODE_TOKENS_PER_S * scale(shape)
        n = len(config.models)
        return Estimate((rows * scale(shape) + bench_s) * n, 0.0, 4 * params(shape) + 2**30, f"{n} models"), shape

    def run(self, config: EvaluateRun, flow, work):
        names = {stage_name(k): m for k, m in config.models.items()}
        fps = {stage_name(k): flow.fingerprints[k] for k in config.models}
        return {"rows": evaluate_models(names, fps, config.evaluate, config.task, work.dir, flow.root / "measured",
                                        work.log)}


@dataclass
class ExportRun:
    """The export stage's config: its section, the final model, the fine-tuning run, the task, and
    the recipe's text (for the model card)."""

    export: ExportStage
    final: str
    finetune: str | None
    task: str | None
    card: str


class Export(Stage):
    kind, joined, joins = "export", ("gguf.model", "gguf.out"), "the final model, into the export stage's directory"

    def resolve(self, flow):
        return ExportRun(flow.cfg.export, flow.model, flow.finetune_dir, flow.task(), flow.text)

    def check(self, config: ExportRun, shape, flow):
        cfg = config.export
        check_gguf(dataclasses.replace(cfg.gguf, model="final", out="final.gguf"))
        check_gguf(dataclasses.replace(cfg.gguf, model="base", type=cfg.adapter_base_type, out="base.gguf"))
        check_exportable(shape)
        disk = params(shape) * (BITS[cfg.gguf.type] / 8 + (4 if cfg.hf else 0))
        return Estimate(60 * scale(shape) + (200 if cfg.check else 0) * scale(shape), disk, 3 * 4 * params(shape),
                        cfg.gguf.type), shape

    def run(self, config: ExportRun, flow, work):
        cfg = config.export
        outputs = deploy.export_files(config.final, config.finetune, cfg, flow.cfg.name, work.dir, work.log)
        row, answers = deploy.check_in_llamacpp(outputs, cfg, flow.cfg.evaluate, config.task, work.dir,
                                                stage_name(self.kind))
        if not answers:  # llama.cpp is not installed (or the check is off): the torch engine answers
            answers = deploy.answers_in_torch(config.final, config.task, cfg.answers)
        phones = deploy.phone_rows(outputs, cfg, flow.cfg.evaluate, stage_name(self.kind))
        return {**outputs, "row": row, "phone_rows": phones, "answers": answers}


class Serve(Stage):
    kind = "serve"

    def check(self, config, shape, flow):
        return Estimate(0.0, 0.0, 4 * params(shape), "prints the command (or starts it with --serve)"), shape


# In the order they run; each has a fixed number, so its directory is runs/<name>/NN-kind whatever
# other stages a recipe turns on or off.
STAGES: list[Stage] = [Base(), Prepare(), Prune(), LowRank(), Distill(), Finetune(), Quantize(), Evaluate(),
                       Export(), Serve()]
BY_KIND = {stage.kind: stage for stage in STAGES}
KINDS = [stage.kind for stage in STAGES]


def stage_name(kind: str) -> str:
    return f"{KINDS.index(kind) + 1:02d}-{kind}"


def advance(flow: Flow, kind: str, fp: str, outputs: dict) -> None:
    """Record a finished stage's outputs in the flow (for the stages after it)."""
    stage = BY_KIND[kind]
    flow.fingerprints[kind] = fp
    if "data" in outputs:
        flow.data = outputs["data"]
    if stage.makes_model:
        flow.model = outputs["model"]
        flow.models[kind] = outputs["model"]
    if stage.trains:
        flow.curves[stage_name(kind)] = Path(outputs["run_dir"])
    if kind == "finetune":
        flow.finetune_dir = outputs["run_dir"]

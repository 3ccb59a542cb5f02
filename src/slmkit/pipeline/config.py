"""The pipeline recipe: one section per stage, and each section is the stage's command config.

    name: symptom2disease
    base: {model: smollm2-135m-instruct}
    finetune: {method: lora, data: {task: symptom2disease}, ...}    # slm finetune's FinetuneConfig
    quantize: {quant: {method: gptq, group_size: 64}}               # slm quantize's QuantizeJob
    evaluate: {task_limit: null, general: [arc_easy], ...}
    export: {gguf: {type: q4_0}}

A section left out (or `null`) skips that stage. The paths that join the stages (a stage's input
model, its output directory, distillation's data) are set by the pipeline: writing them in a
section is refused, so a recipe cannot point a stage somewhere else by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.prepare import PrepareConfig
from slmkit.evals.device import BenchSettings
from slmkit.jobs.compress import LowRankJob, PruneJob, QuantizeJob
from slmkit.jobs.evaluate import EvalJob
from slmkit.jobs.export import ExecutorchJob, GgufJob, LitertJob, OnnxJob
from slmkit.presets import DEFAULT_MODEL
from slmkit.train.adapt import FinetuneConfig
from slmkit.train.distill import DistillConfig


@dataclass
class BaseStage:
    model: str = DEFAULT_MODEL
    """the starting MODEL: GGUF file, HF directory or the bundled SmolLM2-135M-Instruct"""


@dataclass
class EvaluateStage:
    task: str | None = None
    """the task's own metric (slm eval's name, e.g. symptom2disease); default: the fine-tuning task, if any"""
    data: str | None = field(default=None, metadata={"metavar": "FILE.jsonl"})
    """your own held-out rows (slm eval --data) scored in place of a built-in task; with finetune.data.train, a label that file never shows is refused before work"""
    task_limit: int | None = None
    """documents of the task's test split scored (None = all)"""
    general: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])
    """general tasks (slm eval's names) that show what the other stages cost outside the task"""
    general_limit: int | None = 200
    """documents per general task (None = all)"""
    stages: list[str] | None = None
    """the stages whose models are scored, by kind (e.g. [base, quantize]: a fine-tuned model the next stage
    quantizes is then scored once, in its final form); null = every stage that made a model"""
    eval: EvalJob = field(default_factory=EvalJob)
    """scoring settings (batch_size, seed, data_dir, runtime); the model and tasks are set per stage"""
    bench: BenchSettings | None = field(default_factory=lambda: BenchSettings(prompt_tokens=128, new_tokens=64, runs=3))

    def task_job(self, task: str) -> dict:
        """The EvalJob fields that score the lead task: the user's file (`data`) or the named task."""
        return {"tasks": None, "data": self.data} if self.data else {"tasks": task}
    """`slm bench` settings for each stage's model (torch engine: the weights as each stage left them); null = no speed columns"""


@dataclass
class ExportStage:
    gguf: GgufJob = field(default_factory=lambda: GgufJob(type="q4_0"))
    """the final model as one GGUF (model and out are set by the pipeline)"""
    hf: bool = True
    """write the final model as an HF-style directory with a model card (README.md)"""
    adapter: bool = True
    """when fine-tuning made an adapter: also its llama.cpp LoRA file and its base's GGUF (`adapter_base_type`)"""
    adapter_base_type: str = "q8_0"
    """GGUF type of the base the llama.cpp adapter runs over"""
    check: bool = True
    """run the final GGUF in llama.cpp: score the task and measure speed (a row of its own in the report)"""
    answers: int = 3
    """held-out task prompts answered by the final GGUF and shown in the report (0 = none)"""
    executorch: ExecutorchJob | None = None
    """also the final model as an ExecuTorch program for phones ({precision: 8da4w}; model and out are set by the pipeline), timed in a report row of its own; null = none"""
    onnx: OnnxJob | None = None
    """also the final model as an ONNX Runtime GenAI directory ({precision: int4}; model and out are set by the pipeline), timed in a report row of its own; null = none"""
    litert: LitertJob | None = None
    """also the final model as a LiteRT file ({precision: int8}; model and out are set by the pipeline), timed in a report row of its own; null = none"""


@dataclass
class ServeStage:
    name: str = ""
    """the served model name (default: the pipeline's name)"""
    port: int = 8000
    """TCP port of `slm serve` (it binds 127.0.0.1)"""


@dataclass
class PipelineConfig:
    name: str = ""
    """the pipeline's name: its runs go to runs/<name> unless `out` says otherwise"""
    out: str = ""
    """run directory (default runs/<name>)"""
    base: BaseStage = field(default_factory=BaseStage)
    prepare: PrepareConfig | None = None
    """tokenize a corpus for distillation (slm prepare); out is set by the pipeline"""
    prune: PruneJob | None = None
    """slm prune (structured for a smaller, faster model); model and out are set by the pipeline"""
    lowrank: LowRankJob | None = None
    """slm lowrank (factorize the linears); model and out are set by the pipeline"""
    distill: DistillConfig | None = None
    """slm distill: heal the pruned model (or train a new student) from the base as teacher; student, data and out are set by the pipeline"""
    finetune: FinetuneConfig | None = None
    """slm finetune; base and out are set by the pipeline"""
    quantize: QuantizeJob | None = None
    """slm quantize; model and out are set by the pipeline"""
    evaluate: EvaluateStage | None = field(default_factory=EvaluateStage)
    export: ExportStage | None = field(default_factory=ExportStage)
    serve: ServeStage | None = None
    """print the `slm serve` command for the final model (start it with --serve)"""


@dataclass
class Recipe:
    """A read recipe: its config, what the user wrote (which keys are set, not defaulted) and its text."""

    cfg: PipelineConfig
    raw: dict  # the recipe as written (overrides applied)
    text: str  # the YAML as written, for the model card

    @property
    def root(self) -> Path:
        return Path(self.cfg.out or Path("runs") / self.cfg.name)

    def written(self, kind: str, key: str) -> bool:
        """Whether the recipe itself sets `key` in section `kind` (as opposed to a default)."""
        section = self.raw.get(kind)
        return isinstance(section, dict) and key in section

"""`slm pipeline RECIPE` and `slm demo` as verbs: their settings, and the run that prints the stage
table and where the report went (the pipeline itself is run.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.pipeline.run import Options, run_pipeline
from slmkit.pipeline.summary import print_summary
from slmkit.runtime import use_threads


@dataclass
class PipelineJob:
    recipe: str = ""
    """pipeline YAML, e.g. configs/pipeline/symptom2disease.yaml"""
    overrides: list[str] = field(default_factory=list, metadata={"metavar": "key=value"})
    """settings that override the recipe's (nested with dots, e.g. finetune.train.lr=5e-4)"""
    from_stage: str | None = field(default=None, metadata={"flag": "--from", "metavar": "STAGE"})
    """redo STAGE and every stage after it"""
    only: str | None = field(default=None, metadata={"metavar": "STAGE"})
    """redo STAGE alone (the stages before it must be done)"""
    dry_run: bool = False
    """print the plan (what runs, time, disk, peak memory) and check every stage's settings and inputs; do no work"""
    serve: bool = False
    """start `slm serve` on the final model at the end"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


@dataclass
class DemoJob:
    recipe: str = "configs/pipeline/demo.yaml"
    """the pipeline recipe `slm demo` runs (`make demo`: the bundled model fine-tuned, quantized, evaluated and exported in under 10 minutes)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


def run_pipeline_verb(job: PipelineJob) -> int:
    if not job.recipe:
        raise SlmError("give the pipeline RECIPE (a YAML file, e.g. configs/pipeline/symptom2disease.yaml)")
    if job.from_stage and job.only:
        raise SlmError("give --from or --only, not both")
    options = Options(from_stage=job.from_stage, only=job.only, dry_run=job.dry_run, serve=job.serve)
    return _run(job.recipe, job.overrides, job.threads, options)


def run_demo(job: DemoJob) -> int:
    if not Path(job.recipe).is_file():
        raise SlmError(f"the demo recipe '{job.recipe}' is not here; run `slm demo` from the slmkit checkout "
                       "(or give recipe=PATH)")
    return _run(job.recipe, [], job.threads, Options())


def _run(recipe: str, overrides: list[str], threads: int | None, options: Options) -> int:
    use_threads(threads)
    result = run_pipeline(recipe, overrides, options)
    if options.dry_run:
        return 0
    print_summary(result["rows"], result["answers"])
    print(f"report: {result['report']} (and {result['markdown']})")
    if options.serve:
        command = result.get("serve") or ["slm", "serve", result["final"]]
        os.execv(sys.executable, [sys.executable, "-m", "slmkit.cli", *command[1:]])
    return 0


PIPELINE_EXAMPLES = """examples:
  slm pipeline configs/pipeline/symptom2disease.yaml --dry-run     # the plan, rough estimates, every check
  slm pipeline configs/pipeline/symptom2disease.yaml               # run it; again: only what changed reruns
  slm pipeline configs/pipeline/symptom2disease.yaml finetune.train.lr=5e-4   # fine-tune onward reruns
  slm pipeline configs/pipeline/tiny-story-teller.yaml --from quantize

Stages, in order (a recipe section turns one on; each section is that command's own config):
  base, prepare (slm prepare), prune (slm prune), lowrank (slm lowrank), distill (slm distill),
  finetune (slm finetune), quantize (slm quantize), evaluate (slm eval + slm bench per model),
  export (HF directory + model card, GGUF, llama.cpp adapter), serve (prints slm serve ...).
Each writes runs/<name>/NN-stage/ with its config and a fingerprint of its inputs: a stage whose
fingerprint matches is skipped, a kill -9 is continued (training resumes from its last checkpoint),
and runs/<name>/report.html + report.md compare every stage.
"""

"""`slm pipeline RECIPE` and `slm demo` as verbs: their settings, and the run that prints the stage
table and where the report went (the pipeline itself is run.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slmkit.errors import SlmError
from slmkit.pipeline.report import stage_table
from slmkit.pipeline.run import PipelineJob, run_pipeline
from slmkit.runtime import use_threads


@dataclass
class DemoJob(PipelineJob):
    recipe: str = "configs/pipeline/demo.yaml"
    """the pipeline recipe `slm demo` runs (`make demo`: the bundled model fine-tuned, quantized, evaluated and
    exported in under 10 minutes)"""


def run_demo(job: DemoJob) -> int:
    if not Path(job.recipe).is_file():
        raise SlmError(f"the demo recipe '{job.recipe}' is not here; run `slm demo` from the slmkit checkout "
                       "(or give recipe=PATH)")
    return run_pipeline_verb(job)


def run_pipeline_verb(job: PipelineJob) -> int:
    use_threads(job.threads)
    result = run_pipeline(job)
    if job.dry_run:
        return 0
    print_summary(result["rows"], result["answers"])
    print(f"report: {result['report']} (and {result['markdown']})")
    if job.serve:
        command = result.get("serve") or ["slm", "serve", result["final"]]
        os.execv(sys.executable, [sys.executable, "-m", "slmkit.cli", *command[1:]])
    return 0


def print_summary(rows: list[dict], answers: list[dict]) -> None:
    """The report's stage table in the terminal, then the final model's answers to held-out questions."""
    console, (headers, cells) = Console(), stage_table(rows)
    table = Table(title="what each stage did (held-out rows only)")
    for header in headers:
        table.add_column(header, justify="left" if header == "stage" else "right")
    for row in cells:
        table.add_row(*map(escape, row))  # a stage or task name is text, not markup
    console.print(table)
    for answer in answers:
        console.print(f"[bold cyan]user>[/] {escape(answer['question'])}")
        for label, text in answer.items():
            if label not in ("question", "expected"):
                console.print(f"[bold]{escape(label)}>[/] {escape(text)}")
        console.print(f"[dim](answer in the data: {escape(answer['expected'])})[/]")


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

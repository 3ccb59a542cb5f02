"""`--dry-run`, and the check every run starts with: each stage's config is resolved and checked
against the model shape it will see (predicted through pruning and distillation on the `meta`
device, no weights), its input files and task data are looked up, and a rough time, disk and
peak-memory estimate is made (estimate.py). Any problem is one line, before the first stage does
work. Each stage's own `check` does its part (stages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from slmkit.config import to_dict
from slmkit.load import inspect
from slmkit.pipeline.config import Recipe
from slmkit.pipeline.estimate import Estimate
from slmkit.pipeline.stages import BY_KIND, Flow, advance, stage_name
from slmkit.pipeline.state import StageDir, fingerprint
from slmkit.sizing import human_bytes


@dataclass
class Step:
    kind: str
    config: Any
    fingerprint: str
    up_to_date: bool
    estimate: Estimate


def check(recipe: Recipe, kinds: list[str]) -> list[Step]:
    """Resolve and check every stage in order; returns the plan (refuses bad input in one line)."""
    flow = Flow.start(recipe)
    shape = inspect(recipe.cfg.base.model).config  # a missing file or unknown name fails here, with the close names
    steps = []
    for kind in kinds:
        stage = BY_KIND[kind]
        config = stage.resolve(flow)
        estimate, shape = stage.check(config, shape, flow)
        fp = fingerprint(kind, to_dict(config), list(flow.fingerprints.values()), recipe.root)
        steps.append(Step(kind, config, fp, StageDir(flow.stage_dir(kind)).is_done(fp), estimate))
        advance(flow, kind, fp, stage.outputs(config))
    return steps


def show(recipe: Recipe, steps: list[Step], log: Callable[[str], object]) -> None:
    table = Table(title=f"pipeline {recipe.cfg.name} -> {recipe.root} (rough estimates for this machine class)")
    for column in ("stage", "status", "time", "disk", "peak memory", "what"):
        table.add_column(column, justify="right" if column in ("time", "disk", "peak memory") else "left")
    for s in steps:
        status = "prints" if s.kind == "serve" else "up to date" if s.up_to_date else "will run"
        e = s.estimate
        table.add_row(stage_name(s.kind), status, "-" if s.up_to_date else _minutes(e.seconds),
                      human_bytes(e.disk_bytes), human_bytes(e.peak_bytes), e.note)
    Console().print(table)
    todo = [s for s in steps if not s.up_to_date and s.kind != "serve"]
    log(f"{len(todo)} of {len(steps)} stages would run, ~{_minutes(sum(s.estimate.seconds for s in todo))} in all")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min"

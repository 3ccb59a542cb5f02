"""The pipeline's driver: run the stages in order, skipping those whose fingerprint says their
result is still valid, continuing those a kill interrupted, and ending with the report (the verb
and its examples: verb.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slmkit.config import to_dict
from slmkit.errors import SlmError, unknown_choice
from slmkit.pipeline import plan, report
from slmkit.pipeline.card import FILES, write_model_card
from slmkit.pipeline.recipe import read_recipe
from slmkit.pipeline.stages import BY_KIND, KINDS, Flow, Work, advance, stage_name
from slmkit.pipeline.state import StageDir
from slmkit.presets import HUB_IDS

Log = Callable[[str], object]


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
class Done:
    """A finished (or skipped) stage: its record for the report."""

    kind: str
    ran: bool
    wall_s: float
    outputs: dict = field(default_factory=dict)


def run_pipeline(options: PipelineJob, log: Log = print) -> dict:
    """Run (or plan) the pipeline; returns {"report": path, "stages": [Done...], "serve": command}
    (a dry run: {"plan": [Step...]})."""
    if options.from_stage and options.only:
        raise SlmError("give --from or --only, not both")
    recipe = read_recipe(options.recipe, options.overrides)
    kinds = [k for k in KINDS if k == "base" or getattr(recipe.cfg, k) is not None]  # the stages it turns on
    for name in (options.from_stage, options.only):
        if name is not None and name not in kinds:
            raise unknown_choice("stage of this pipeline", name, kinds)
    steps = plan.check(recipe, kinds)  # every stage's config and inputs, before any work
    if options.dry_run:
        plan.show(recipe, steps, log)
        return {"plan": steps}
    flow = Flow.start(recipe)
    done = [_stage(step, flow, options, log) for step in steps if step.kind != "serve"]
    paths = _finish(flow, done, log)
    if "serve" in kinds:
        paths["serve"] = serve_command(flow, done)
        log(f"serve it: {' '.join(paths['serve'])}")
    return paths


def _stage(step: plan.Step, flow: Flow, options: PipelineJob, log: Log) -> Done:
    """Run one stage of the plan (its config and fingerprint were resolved by the plan: a stage's
    outputs are where the plan said they would be), or skip it when it is up to date."""
    kind, config, fp = step.kind, step.config, step.fingerprint
    where = StageDir(flow.stage_dir(kind))
    forced = _forced(kind, options)
    if where.is_done(fp) and not forced:
        record = where.finished()
        log(f"{stage_name(kind)}: up to date (fingerprint {fp[:12]}), skipped")
        advance(flow, kind, fp, record["outputs"])
        return Done(kind, False, record["wall_s"], record["outputs"])
    if options.only is not None and kind != options.only:
        raise SlmError(f"--only {options.only}: stage {stage_name(kind)} before it is not done (or its inputs "
                       "changed); run the pipeline without --only first")
    stage = BY_KIND[kind]
    continuing = where.begin(fp, to_dict(config))  # a killed run of the same fingerprint is here
    resume = continuing and stage.trains and (where.path / "last").is_dir()
    if continuing and not resume:  # nothing to continue from (no checkpoint yet): start clean
        where.restart(fp, to_dict(config))
    log(f"{stage_name(kind)}: {'continuing' if resume else 'running'} (fingerprint {fp[:12]})")
    started = time.perf_counter()
    outputs = stage.run(config, flow, Work(where.path, resume, log))
    wall = time.perf_counter() - started
    where.finish(fp, {"kind": kind, "wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "outputs": outputs})
    advance(flow, kind, fp, outputs)
    log(f"{stage_name(kind)}: done in {wall:.0f}s")
    return Done(kind, True, wall, outputs)


def _forced(kind: str, options: PipelineJob) -> bool:
    if options.only is not None:
        return kind == options.only
    return options.from_stage is not None and KINDS.index(kind) >= KINDS.index(options.from_stage)


def _rows(done: list[Done]) -> list[dict]:
    """The report's rows: each evaluated model (with its producing stage's wall time), then the GGUF and
    the phone exports."""
    wall = {stage_name(d.kind): d.wall_s for d in done}
    rows = []
    for d in done:
        if d.kind == "evaluate":
            rows += [{**r, "wall_s": wall.get(r["stage"])} for r in d.outputs["rows"]]
        if d.kind == "export" and d.outputs.get("row"):
            rows.append({**d.outputs["row"], "wall_s": d.wall_s})
        if d.kind == "export":
            rows += d.outputs.get("phone_rows", [])
    return rows


def _finish(flow: Flow, done: list[Done], log: Log) -> dict:
    rows = _rows(done)
    export = next((d for d in done if d.kind == "export"), None)
    notes = [f"{stage_name(d.kind)}: {'ran' if d.ran else 'up to date'} ({d.wall_s:.0f}s)" for d in done]
    final_stage = stage_name(list(flow.models)[-1]) if flow.models else None  # what the HF directory holds
    if export is not None and export.outputs.get("hf") and any(r["stage"] == final_stage for r in rows):
        files = {k: v for k, v in export.outputs.items() if k in FILES and v}
        card = write_model_card(Path(export.outputs["hf"]), flow.cfg.name, HUB_IDS.get(flow.cfg.base.model, flow.cfg.base.model),
                                flow.text, rows, final_stage, extra=files)
        log(f"model card: {card}")
    answers = export.outputs.get("answers", []) if export else []
    html, md = report.write_report(flow.root, f"pipeline {flow.cfg.name}", rows, flow.curves, notes,
                                   answers=answers)
    return {"report": html, "markdown": md, "stages": done, "rows": rows, "answers": answers,
            "final": _final(done, flow.model)}


def _final(done: list[Done], model: str) -> str:
    """The final model: the exported HF directory when there is one, else the last stage's model."""
    export = next((d for d in done if d.kind == "export"), None)
    return (export.outputs.get("hf") or export.outputs["model"]) if export else model


def serve_command(flow: Flow, done: list[Done]) -> list[str]:
    """The `slm serve` command for the final model."""
    serve = flow.cfg.serve
    return ["slm", "serve", f"{serve.name or flow.cfg.name}={_final(done, flow.model)}", "--port", str(serve.port)]

"""`slm pipeline RECIPE.yaml`: run the stages in order, skipping those whose fingerprint says
their result is still valid, continuing those a kill interrupted, and ending with the report.

    slm pipeline configs/pipeline/symptom2disease.yaml                 # run (or finish) it
    slm pipeline configs/pipeline/symptom2disease.yaml finetune.train.lr=5e-4   # reruns finetune onward
    slm pipeline RECIPE --dry-run          # the plan: what runs, estimates; refuses bad input
    slm pipeline RECIPE --from quantize    # redo quantize and everything after it
    slm pipeline RECIPE --only evaluate    # redo one stage (the ones before it must be done)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmkit.errors import SlmError, unknown_choice
from slmkit.presets import DEFAULT_MODEL
from slmkit.pipeline import deploy, plan, report
from slmkit.pipeline.card import write_model_card
from slmkit.pipeline.config import STAGES
from slmkit.pipeline.measure import evaluate_models
from slmkit.pipeline.recipe import Recipe, read_recipe
from slmkit.pipeline.stages import Flow, advance, config_dict, run_stage, stage_name
from slmkit.pipeline.state import StageDir, fingerprint

Log = Callable[[str], object]


@dataclass
class Options:
    from_stage: str | None = None
    only: str | None = None
    dry_run: bool = False
    serve: bool = False


@dataclass
class Done:
    """A finished (or skipped) stage: its record for the report."""

    kind: str
    ran: bool
    wall_s: float
    outputs: dict = field(default_factory=dict)


def enabled_stages(recipe: Recipe) -> list[str]:
    return [k for k in STAGES if k == "base" or getattr(recipe.cfg, k) is not None]


def run_pipeline(path: str | Path, overrides: list[str] = (), options: Options = Options(),
                 log: Log = print) -> dict:
    """Run (or plan) the pipeline; returns {"report": path, "stages": [Done...], "serve": command}."""
    recipe = read_recipe(path, overrides)
    kinds = enabled_stages(recipe)
    for name in (options.from_stage, options.only):
        if name is not None and name not in kinds:
            raise unknown_choice("stage of this pipeline", name, kinds)
    steps = plan.check(recipe, kinds)  # every stage's config and inputs, before any work
    if options.dry_run:
        plan.show(recipe, steps, log)
        return {"plan": steps}
    flow = Flow(recipe.cfg, recipe.raw, recipe.root)
    done = [_stage(kind, recipe, flow, options, log) for kind in kinds if kind != "serve"]
    paths = _finish(recipe, flow, done, log)
    if "serve" in kinds:
        paths["serve"] = serve_command(recipe, done)
        log(f"serve it: {' '.join(paths['serve'])}")
    return paths


def _stage(kind: str, recipe: Recipe, flow: Flow, options: Options, log: Log) -> Done:
    config = plan.stage_config(kind, recipe, flow)
    fp = fingerprint(kind, config_dict(config), list(flow.fingerprints.values()), recipe.root)
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
    if forced and where.finished() is not None:
        where.restart(fp, config_dict(config))
    continuing = where.begin(fp, config_dict(config))
    log(f"{stage_name(kind)}: {'continuing' if continuing else 'running'} (fingerprint {fp[:12]})")
    started = time.perf_counter()
    outputs = _work(kind, config, flow, where, continuing, log)
    wall = time.perf_counter() - started
    where.finish(fp, {"kind": kind, "wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "outputs": outputs})
    advance(flow, kind, fp, outputs)
    log(f"{stage_name(kind)}: done in {wall:.0f}s")
    return Done(kind, True, wall, outputs)


def _forced(kind: str, options: Options) -> bool:
    if options.only is not None:
        return kind == options.only
    return options.from_stage is not None and STAGES.index(kind) >= STAGES.index(options.from_stage)


def _work(kind: str, config: Any, flow: Flow, where: StageDir, continuing: bool, log: Log) -> dict:
    if kind == "evaluate":
        names = {stage_name(k): m for k, m in flow.models.items()}
        fps = {stage_name(k): flow.fingerprints[k] for k in flow.models}
        return {"rows": evaluate_models(names, fps, flow.cfg.evaluate, config["task"], where.path,
                                        flow.root / "measured", log)}
    if kind == "export":
        return _export(config, flow, where.path, log)
    resume = continuing and kind in ("distill", "finetune") and (where.path / "last").is_dir()
    if continuing and not resume:
        where.restart(where.started()["fingerprint"], config_dict(config))  # nothing to continue from: start clean
    return run_stage(kind, config, where.path, resume, log)


def _export(config: dict, flow: Flow, out: Path, log: Log) -> dict:
    cfg = flow.cfg.export
    outputs = deploy.export_files(flow.model, flow.finetune_dir, cfg, flow.cfg.name, out, log)
    row, answers = deploy.check_in_llamacpp(outputs, cfg, flow.cfg.evaluate, config["task"], out, stage_name("export"))
    if not answers:  # llama.cpp is not installed (or the check is off): the torch engine answers
        answers = deploy.answers_in_torch(flow.model, config["task"], cfg.answers)
    outputs.update({"row": row, "answers": answers})
    return outputs


def _rows(done: list[Done]) -> list[dict]:
    """The report's rows: each evaluated model (with its producing stage's wall time), then the GGUF."""
    wall = {stage_name(d.kind): d.wall_s for d in done}
    rows = []
    for d in done:
        if d.kind == "evaluate":
            rows += [{**r, "wall_s": wall.get(r["stage"])} for r in d.outputs["rows"]]
        if d.kind == "export" and d.outputs.get("row"):
            rows.append({**d.outputs["row"], "wall_s": d.wall_s})
    return rows


def _finish(recipe: Recipe, flow: Flow, done: list[Done], log: Log) -> dict:
    rows = _rows(done)
    export = next((d for d in done if d.kind == "export"), None)
    notes = [f"{stage_name(d.kind)}: {'ran' if d.ran else 'up to date'} ({d.wall_s:.0f}s)" for d in done]
    final_stage = stage_name(list(flow.models)[-1]) if flow.models else None  # what the HF directory holds
    if export is not None and export.outputs.get("hf") and any(r["stage"] == final_stage for r in rows):
        card = write_model_card(Path(export.outputs["hf"]), recipe.cfg.name, _hub_name(recipe.cfg.base.model),
                                recipe.text, rows, final_stage, extra=_files(export.outputs))
        log(f"model card: {card}")
    answers = export.outputs.get("answers", []) if export else []
    html, md = report.write_report(recipe.root, f"pipeline {recipe.cfg.name}", rows, flow.curves, notes,
                                   answers=answers)
    final = (export.outputs.get("hf") or export.outputs["model"]) if export else flow.model
    return {"report": html, "markdown": md, "stages": done, "rows": rows, "answers": answers, "final": final}


def _hub_name(model: str) -> str:
    """The card's base_model: the Hub id of the bundled model, else the MODEL as given."""
    return "HuggingFaceTB/SmolLM2-135M-Instruct" if model == DEFAULT_MODEL else model


def _files(outputs: dict) -> dict:
    return {k: outputs[k] for k in ("gguf", "lora_gguf", "base_gguf") if outputs.get(k)}


def serve_command(recipe: Recipe, done: list[Done]) -> list[str]:
    """The `slm serve` command for the final model (the exported HF directory when there is one)."""
    export = next((d for d in done if d.kind == "export"), None)
    final = (export.outputs.get("hf") or export.outputs["model"]) if export else next(
        (d.outputs["model"] for d in reversed(done) if "model" in d.outputs), recipe.cfg.base.model)
    serve = recipe.cfg.serve
    return ["slm", "serve", f"{serve.name or recipe.cfg.name}={final}", "--port", str(serve.port)]

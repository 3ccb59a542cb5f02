"""The evaluate stage: one row per model a stage produced -- the task's own metric (and the
hallucination rate where the task has labels), a few general tasks, and `slm bench` speed and
memory -- each measured by the commands' own jobs (`run_eval`, `measure`).

A row is kept in runs/<pipeline>/measured/ under the producing stage's fingerprint and the
evaluation settings (outside the stage directory, which a changed upstream stage clears), so a
pipeline whose fine-tuning changed re-measures the fine-tuned and later models only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

from slmkit.config import to_dict
from slmkit.evals.device import BenchSettings, measure
from slmkit.evals.report import PRIMARY
from slmkit.fileio import write_json
from slmkit.jobs.evaluate import EvalJob, run_eval
from slmkit.pipeline.config import EvaluateStage

Log = Callable[[str], object]


def task_of(stage: EvaluateStage, finetune_task: str | None) -> str | None:
    """The task whose own metric the report leads with: the recipe's, else the fine-tuning task."""
    return stage.task or finetune_task or None


def evaluate_models(models: dict[str, str], fingerprints: dict[str, str], stage: EvaluateStage,
                    task: str | None, out: Path, kept: Path, log: Log) -> list[dict]:
    """A row per model (stage dir name -> model path), measured or read back from its cache."""
    settings = json.dumps({"evaluate": to_dict(stage), "task": task}, sort_keys=True, default=str)
    kept.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model in models.items():
        key = hashlib.sha256(f"{fingerprints[name]}\0{settings}".encode()).hexdigest()
        cache = kept / f"{name}-{key[:16]}.json"
        cached = _read(cache)
        if cached is not None and cached.get("key") == key:
            log(f"  {name}: measured before (kept)")
            rows.append(cached["row"])
            continue
        log(f"  {name}: measuring {model}")
        row = measure_model(name, model, stage.eval, stage.bench, task, stage.task_limit, stage.general,
                            stage.general_limit, out)
        write_json(cache, {"key": key, "row": row})
        rows.append(row)
    return rows


def measure_model(name: str, model: str, job: EvalJob, bench: BenchSettings | None, task: str | None,
                  task_limit: int | None, general: list[str], general_limit: int | None, out: Path) -> dict:
    """One report row: quality on the task and the general tasks, then speed and memory."""
    row: dict = {"stage": name, "model": model}
    if task:
        doc = run_eval(dataclasses.replace(job, model=model, tasks=task, limit=task_limit,
                                           output=str(out / f"{name}-task.json")))
        row.update(task_cells(task, doc))
    if general:
        doc = run_eval(dataclasses.replace(job, model=model, tasks=",".join(general), limit=general_limit,
                                           output=str(out / f"{name}-general.json")))
        row["general"] = {r["task"]: _primary(r["metrics"]) for r in doc["results"]}
        row.setdefault("params", doc["model_info"]["params"])
        row.setdefault("file_mib", doc["model_info"]["file_mib"])
    if bench is not None:
        row.update(speed_cells(model, bench))
    return row


def task_cells(task: str, doc: dict) -> dict:
    result = doc["results"][0]
    metrics = result["metrics"]
    primary = _primary(metrics)
    info = doc["model_info"]
    return {"task": {"name": task, **primary, "stderr": (result.get("stderr") or {}).get(primary["metric"])},
            "hallucination_rate": metrics.get("hallucination_rate"), "params": info["params"],
            "file_mib": info["file_mib"]}


def _primary(metrics: dict) -> dict:
    """{"metric", "value"}: the metric a task is summarised by (as `slm report` picks it)."""
    name = next((m for m in PRIMARY if m in metrics), None) or next(
        m for m in metrics if not m.endswith("_stderr"))
    return {"metric": name, "value": metrics[name]}


def speed_cells(model: str, bench: BenchSettings) -> dict:
    """`slm bench` in a fresh process: parameters, file size, peak memory, prefill and decode tok/s
    at the first batch size."""
    result = measure(model, bench)
    batch = result.batches[str(bench.batches[0])]
    return {"params": result.params, "file_mib": result.file_mib, "peak_rss_mib": result.peak_mib,
            "prefill_tps": batch["prefill_tok_s"]["median"], "decode_tps": batch["decode_tok_s"]["median"],
            "engine": result.engine}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

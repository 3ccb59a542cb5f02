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
from slmkit.evals.report import primary_metric
from slmkit.fileio import read_json, write_json
from slmkit.jobs.evaluate import run_eval
from slmkit.pipeline.config import EvaluateStage

Log = Callable[[str], object]


def evaluate_models(models: dict[str, str], fingerprints: dict[str, str], stage: EvaluateStage,
                    task: str | None, out: Path, kept: Path, log: Log) -> list[dict]:
    """A row per model (stage dir name -> model path), measured or read back from its cache."""
    settings = json.dumps({"evaluate": to_dict(stage), "task": task}, sort_keys=True, default=str)
    kept.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model in models.items():
        key = hashlib.sha256(f"{fingerprints[name]}\0{settings}".encode()).hexdigest()
        cache = kept / f"{name}-{key[:16]}.json"
        cached = read_json(cache)
        if cached is None or cached.get("key") != key:
            log(f"  {name}: measuring {model}")
            cached = {"key": key, "row": measure_model(name, model, stage, task, out)}
            write_json(cache, cached)
        else:
            log(f"  {name}: measured before (kept)")
        rows.append(cached["row"])
    return rows


def measure_model(name: str, model: str, stage: EvaluateStage, task: str | None, out: Path) -> dict:
    """One report row: quality on the task and the general tasks, then speed and memory."""
    row: dict = {"stage": name, "model": model}

    def score(limit: int | None, part: str, **tasks) -> dict:
        return run_eval(dataclasses.replace(stage.eval, model=model, limit=limit,
                                            output=str(out / f"{name}-{part}.json"), **tasks))
    if task:
        row.update(task_cells(task, score(stage.task_limit, "task", **stage.task_job(task))))
    if stage.general:
        doc = score(stage.general_limit, "general", tasks=",".join(stage.general))
        row["general"] = {r["task"]: _primary(r["metrics"]) for r in doc["results"]}
        row.setdefault("params", doc["model_info"]["params"])
        row.setdefault("file_mib", doc["model_info"]["file_mib"])
    if stage.bench is not None:
        row.update(speed_cells(model, stage.bench))
    return row


def task_cells(task: str, doc: dict) -> dict:
    result = doc["results"][0]
    metrics = result["metrics"]
    primary = _primary(metrics)
    info = doc["model_info"]
    return {"task": {"name": task, **primary, "stderr": (result.get("stderr") or {}).get(primary["metric"]),
                     "n": result.get("n")},
            "hallucination_rate": metrics.get("hallucination_rate"), "params": info["params"],
            "file_mib": info["file_mib"]}


def _primary(metrics: dict) -> dict:
    name = primary_metric(metrics, any_metric=True)  # as `slm report` picks it
    return {"metric": name, "value": metrics[name]}


def speed_cells(model: str, bench: BenchSettings) -> dict:
    """`slm bench` in a fresh process: parameters, file size, peak memory, prefill and decode tok/s
    at the first batch size."""
    result = measure(model, bench)
    batch = result.batches[str(bench.batches[0])]
    return {"params": result.params, "file_mib": result.file_mib, "peak_rss_mib": result.peak_mib,
            "prefill_tps": batch["prefill_tok_s"]["median"], "decode_tps": batch["decode_tok_s"]["median"],
            "engine": result.engine}

"""`evaluate`: run a list of tasks (at one or more shot counts) and collect a results document;
`save_results` writes it atomically as JSON; `results_table` renders it for a terminal."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from slmkit import __version__
from slmkit.compress.quant.qlinear import weight_count
from slmkit.data.shared import shared_data_dir
from slmkit.errors import SlmError
from slmkit.evals.runner import DEFAULT_SEED, run_task
from slmkit.evals.tasks import make_task
from slmkit.fileio import write_json

CONFUSION_TABLE_MAX = 12  # labels beyond which the confusion matrix is only drawn (the plot), not printed


def default_data_dir() -> Path:
    shared = shared_data_dir()
    if shared is None:
        raise SlmError("the shared evaluation data (../shared/data/eval) is not here; pass --data-dir DIR")
    return shared / "eval"


def parse_shots(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SlmError(f"--shots takes whole numbers separated by commas (e.g. 0,5), not '{text}'") from None
    if not shots or any(s < 0 for s in shots):
        raise SlmError(f"--shots must list numbers >= 0, not '{text}'")
    return shots


def evaluate(lm, task_names: list, shots: list[int] | None = None, limit: int | dict | None = None,
             seed: int = DEFAULT_SEED, data_dir: Path | None = None, progress: bool = True,
             model_name: str = "model", on_result=None) -> dict:
    """Score `lm` on every task (each at `shots`, or its own default) and return the results document.

    task_names: registry names, or Task objects (`user_task`: the user's own file).

    limit: documents per task (MMLU: per subject), one number for all or {task: number or None}.
    on_result(doc so far): called after each task, so a long run can save what it has."""
    if any(isinstance(t, str) for t in task_names):
        data_dir = Path(data_dir) if data_dir else default_data_dir()
    # unknown names fail before any work; a Task object (the user's file) is scored as it is
    tasks = [make_task(t, data_dir) if isinstance(t, str) else t for t in task_names]
    limits = limit if isinstance(limit, dict) else {task.name: limit for task in tasks}
    if any(v is not None and v < 1 for v in limits.values()):
        raise SlmError("--limit must be at least 1")
    results = []
    for task in tasks:
        for k in shots if shots is not None else [task.default_shots]:
            if progress:
                print(f"{task.name} ({k}-shot)", flush=True)
            results.append(asdict(run_task(lm, task, k, limits.get(task.name), seed, progress)))
            if on_result is not None:
                on_result(_document(model_name, __version__, seed, limit, lm, results))
    return _document(model_name, __version__, seed, limit, lm, results)


def _document(model_name, version, seed, limit, lm, results) -> dict:
    return {"model": model_name, "slmkit_version": version, "seed": seed, "limit": limit,
            "batch_size": getattr(lm, "batch_size", None), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "results": list(results), "fewshot_gain": fewshot_gain(results)}


def fewshot_gain(results: list[dict]) -> dict:
    """For tasks run at several shot counts: each metric at k shots minus at the fewest shots."""
    by_task: dict[str, list[dict]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    gains = {}
    for task, runs in by_task.items():
        if len(runs) < 2:
            continue
        base = min(runs, key=lambda r: r["shots"])
        gains[task] = {f"{r['shots']}-shot": {m: v - base["metrics"][m] for m, v in r["metrics"].items()}
                       for r in runs if r is not base}
    return gains


def model_info(loaded) -> dict:
    """What a report needs to place a variant: parameters, file size and bits per linear weight."""
    model = loaded.model
    section = getattr(model.config, "quantization", None) or {}

    params = weight_count(model)
    bits = section.get("bits") or {"bfloat16": 16, "float16": 16}.get(str(model.dtype)
                                                                      .removeprefix("torch."), 32)
    source_bits = None
    if loaded.source.tensor_types:  # a GGUF: the storage type of most tensors (e.g. Q8_0) says more
        source_bits = max(loaded.source.tensor_types, key=loaded.source.tensor_types.get)
    return {"params": params, "file_mib": loaded.source.file_bytes / 2**20, "bits": bits,
            "quantization": section.get("method"), "gguf_type": source_bits}


def save_results(doc: dict, path: str | Path) -> Path:
    """Written under a temporary name, then renamed: a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)
    return path


def results_table(doc: dict):
    limit = doc["limit"]
    shown = "" if not limit else f", limit {limit}" if not isinstance(limit, dict) else ", default-suite limits"
    table = Table(title=f"{doc['model']} (seed {doc['seed']}{shown})")
    for column in ("task", "shots", "metric", "value", "± stderr", "n", "seconds", "notes"):
        table.add_column(column, justify="left" if column in ("task", "metric", "notes") else "right")
    for r in doc["results"]:
        notes = []
        if r["skipped"]:
            notes.append(f"{r['skipped']} malformed rows skipped (first: {r['extra'].get('first_bad_row')})")
        if r["truncated"]:
            notes.append(f"{r['truncated']} prompts cut from the left to fit the context")
        for i, (metric, value) in enumerate(r["metrics"].items()):
            err = r["stderr"].get(metric)
            table.add_row(r["task"] if i == 0 else "", str(r["shots"]) if i == 0 else "", metric,
                          f"{value:.4f}", "" if err is None or math.isnan(err) else f"{err:.4f}",
                          str(r["n"]) if i == 0 else "", f"{r['seconds']:.0f}" if i == 0 else "",
                          "; ".join(notes) if i == 0 else "")
    return table


def class_table(result: dict) -> Table:
    """Per-class precision and recall (± standard error), F1 and support of a classification result,
    then its confusion matrix when the label set is small enough to read in a terminal."""
    extra = result["extra"]
    table = Table(title=f"{result['task']}: per class (likelihood predictions)")
    for column in ("label", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    se = lambda v: "" if v is None or math.isnan(v) else f" ± {v:.3f}"  # noqa: E731
    for label, c in extra["per_class"].items():
        table.add_row(label, f"{c['precision']:.3f}{se(c['precision_se'])}", f"{c['recall']:.3f}{se(c['recall_se'])}",
                      f"{c['f1']:.3f}", str(c["support"]))
    if len(extra["labels"]) <= CONFUSION_TABLE_MAX:
        table.caption = "confusion (rows: expected, columns: predicted, in label order):\n" + "\n".join(
            f"{label[:16]:>16} " + " ".join(f"{n:>3}" for n in row) for label, row in zip(extra["labels"], extra["confusion"]))
    return table

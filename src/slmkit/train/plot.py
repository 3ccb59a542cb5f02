"""`slm plot RUN_DIR`: training vs validation loss (with the generalisation gap marked) and the
learning rate, from metrics.jsonl, as RUN_DIR/loss.png (drawn by slmkit.plots)."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.plots import loss_curves, save_png


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's (train rows, eval rows)."""
    file = Path(run) / "metrics.jsonl"
    if not file.is_file():
        raise SlmError(f"'{run}' has no metrics.jsonl; is it a training run directory?")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def plot_run(run: str | Path) -> Path:
    run = Path(run)
    train, evals = read_metrics(run)
    if not train:
        raise SlmError(f"'{run}/metrics.jsonl' has no training steps yet")
    return save_png(loss_curves(train, evals, run.name), run / "loss.png")

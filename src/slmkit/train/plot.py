"""`slm plot RUN_DIR`: training vs validation loss (with the generalisation gap marked) and the
learning rate, from metrics.jsonl, as RUN_DIR/loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.errors import SlmError


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    file = run / "metrics.jsonl"
    if not file.is_file():
        raise SlmError(f"'{run}' has no metrics.jsonl; is it a training run directory?")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_run(run: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    train, evals = read_metrics(run)
    if not train:
        raise SlmError(f"'{run}/metrics.jsonl' has no training steps yet")
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    smoothed = smooth(losses)
    ax.plot(steps, smoothed, color="tab:blue", label="train (smoothed)")
    if evals:
        ev_steps, ev_losses = [r["step"] for r in evals], [r["val_loss"] for r in evals]
        ax.plot(ev_steps, ev_losses, "o-", color="tab:orange", label="validation")
        _mark_gap(ax, steps, smoothed, ev_steps[-1], ev_losses[-1])
        best = min(evals, key=lambda r: r["val_loss"])
        ax.axvline(best["step"], color="tab:green", linestyle=":", label=f"best validation (step {best['step']})")
    shown = smoothed + ([r["val_loss"] for r in evals] if evals else [])
    if min(shown) > 0 and max(shown) / min(shown) > 20:  # fine-tuning: from nats to hundredths; the rise shows on a log scale
        ax.set_yscale("log")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.name)
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _mark_gap(ax, steps: list[int], smoothed: list[float], step: int, val: float) -> None:
    """Arrow from the smoothed train loss to the validation loss at the last evaluation."""
    index = min(range(len(steps)), key=lambda i: abs(steps[i] - step))
    train = smoothed[index]
    ax.annotate("", xy=(step, val), xytext=(step, train), arrowprops={"arrowstyle": "<->", "color": "tab:red"})
    ax.text(step, (train + val) / 2, f"  gap {val - train:+.3f}", color="tab:red", va="center")

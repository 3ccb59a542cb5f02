"""Every figure slmkit draws: a labelled scatter (quality vs size or speed, speed vs parameters) and
a training run's loss curves. `slm plot`, `slm report`, `slm bench --sweep` and the pipeline's
report page all draw through here, so a figure looks the same wherever it appears.

matplotlib is imported on first use (Agg backend: no display), not with the package: it costs a
few hundred milliseconds that `slm --help` and the server should not pay.
"""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

from slmkit.fileio import atomic_write

Point = tuple  # (x, y, label) or (x, y, label, colour)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(points: list[Point], xlabel: str, ylabel: str, title: str | None = None, log_x: bool = False,
            path_line: bool = False):
    """One labelled point per (x, y, label[, colour]); `path_line` joins them in order (a pipeline's
    stages, so the path through it shows)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    if path_line:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:gray", alpha=0.4, linewidth=1)
    for x, y, label, *colour in points:
        ax.scatter(x, y, color=colour[0] if colour else None, zorder=3)
        ax.annotate(label, (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.margins(0.12)  # room for the labels of the outermost points
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_plot(counts: list[list[int]], labels: list[str], title: str):
    """A confusion matrix as a heat map: rows the expected label, columns the predicted one, each
    cell's count written in it (empty cells left blank)."""
    n = len(labels)
    size = min(4 + 0.35 * n, 16)
    fig, ax = pyplot().subplots(figsize=(size, size * 0.85))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_yticks(range(n), labels, fontsize=7 if n > 12 else 9)
    top = max((max(row) for row in counts), default=0)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="expected", title=title)
    fig.tight_layout()
    return fig


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_curves(train: list[dict], evals: list[dict], title: str):
    """Training loss (raw faintly, smoothed on top), validation loss with the generalisation gap at
    the last evaluation and the best step marked, and the learning rate below.

    train: metrics.jsonl's train rows ({step, loss, lr}); evals: its eval rows ({step, val_loss})."""
    fig, (ax, ax_lr) = pyplot().subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    smoothed = smooth(losses)
    ax.plot(steps, smoothed, color="tab:blue", label="train (smoothed)")
    evals = [r for r in evals if r.get("val_loss") is not None]
    if evals:
        ev_steps, ev_losses = [r["step"] for r in evals], [r["val_loss"] for r in evals]
        ax.plot(ev_steps, ev_losses, "o-", color="tab:orange", label="validation")
        _mark_gap(ax, steps, smoothed, ev_steps[-1], ev_losses[-1])
        best = min(evals, key=lambda r: r["val_loss"])
        ax.axvline(best["step"], color="tab:green", linestyle=":", label=f"best validation (step {best['step']})")
    shown = smoothed + [r["val_loss"] for r in evals]
    # fine-tuning goes from nats to hundredths of one: on a log scale the late rise still shows
    if min(shown) > 0 and max(shown) / min(shown) > 20:
        ax.set_yscale("log")
    ax.set(ylabel="loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    if all(r.get("lr") is not None for r in train):
        ax_lr.plot(steps, [r["lr"] for r in train], color="tab:gray")
    ax_lr.set(ylabel="learning rate", xlabel="step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _mark_gap(ax, steps: list[int], smoothed: list[float], step: int, val: float) -> None:
    """Arrow from the smoothed train loss to the validation loss at the last evaluation."""
    index = min(range(len(steps)), key=lambda i: abs(steps[i] - step))
    train = smoothed[index]
    ax.annotate("", xy=(step, val), xytext=(step, train), arrowprops={"arrowstyle": "<->", "color": "tab:red"})
    ax.text(step, (train + val) / 2, f"  gap {val - train:+.3f}", color="tab:red", va="center")


def inline_svg(fig, id: str, label: str) -> str:
    """The figure as an <svg> element to inline in an HTML page, with `id` and `label` (its accessible
    name). Its internal ids are prefixed with `id`: every figure names its clip paths and groups
    alike, and in one page the first would win."""
    buffer = io.StringIO()
    with pyplot().rc_context({"svg.fonttype": "none", "svg.hashsalt": id}):  # text as <text>, no glyph defs
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE, which HTML does not take
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{id}-\1"', svg)
    svg = re.sub(r'(url\(#|href="#)([^")]+)', rf"\1{id}-\2", svg)
    return svg.replace("<svg", f'<svg id="{id}" role="img" aria-label="{html.escape(label)}"', 1)


def save_png(fig, path: Path, close: bool = True) -> Path:
    """The figure as a PNG (written atomically; the figure is closed unless `close` is False)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    if close:
        pyplot().close(fig)
    return path

"""`slm report`: one markdown page and PNG plots that compare model variants.

Inputs are the JSON files slmkit writes: `slm eval` results (tasks or --perplexity), `slm bench`
results and bench/quantize.py's table. Variants are matched by their model argument. The plots
are what a person looks at to choose a variant: accuracy against file size, accuracy against
decode speed, perplexity against bits per weight.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.fileio import write_text
from slmkit.plots import save_png, scatter

PRIMARY = ("acc_norm", "acc", "exact_match_flexible", "pass@1")  # the metric a task is summarised by


@dataclass
class Variant:
    name: str
    scores: dict[str, float] = field(default_factory=dict)  # task -> primary metric
    file_mib: float | None = None
    decode_tok_s: float | None = None
    perplexity: float | None = None
    bits: float | None = None

    @property
    def mean_score(self) -> float | None:
        return statistics.fmean(self.scores.values()) if self.scores else None


def primary_metric(metrics: dict, any_metric: bool = False) -> str | None:
    """The metric a task is summarised by: the first of PRIMARY it has (with `any_metric`, else its
    first metric: ROUGE, perplexity)."""
    name = next((m for m in PRIMARY if m in metrics), None)
    return name or (next((m for m in metrics if not m.endswith("_stderr")), None) if any_metric else None)


def collect(paths: list[Path]) -> dict[str, Variant]:
    variants: dict[str, Variant] = {}

    def variant(name: str) -> Variant:
        return variants.setdefault(name, Variant(name))

    for path in _json_files(paths):
        doc = json.loads(path.read_text())
        if doc.get("bench") == "quantize":  # bench/quantize.py
            for name, row in doc["rows"].items():
                v = variant(name)
                v.perplexity, v.file_mib, v.decode_tok_s = row.get("ppl"), row.get("file_mib"), row.get("decode_tok_s")
                v.bits = _bits_of(name)
        elif "settings" in doc and "results" in doc:  # slm bench
            for r in doc["results"]:
                v = variant(r["model"])
                v.decode_tok_s = next(iter(r["batches"].values()))["decode_tok_s"]["median"]
                v.file_mib = v.file_mib or r.get("file_mib") or None
        elif "model" in doc:  # slm eval
            v = variant(doc["model"])
            info = doc.get("model_info", {})
            v.file_mib = v.file_mib or info.get("file_mib") or None
            v.bits = v.bits or info.get("bits")
            if "perplexity" in doc:
                v.perplexity = doc["perplexity"]["perplexity"]
            for r in doc.get("results", []):
                score = r["metrics"].get(primary_metric(r["metrics"]))
                if score is not None:
                    v.scores[f"{r['task']} ({r['shots']}-shot)"] = score
        else:
            raise SlmError(f"{path} is not a results file slmkit wrote (slm eval, slm bench or bench/quantize.py)")
    return variants


def _bits_of(name: str) -> float | None:
    for key, bits in (("int4", 4), ("gptq", 4), ("awq", 4), ("q4", 4.5), ("int8", 8), ("q8", 8.5), ("bf16", 16),
                      ("fp32", 32)):
        if key in name:
            return bits
    return None


def _json_files(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.rglob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise SlmError(f"{p} does not exist")
    if not files:
        raise SlmError("no results JSON found in " + ", ".join(map(str, paths)))
    return files


def write_report(paths: list[Path], out_dir: Path) -> Path:
    variants = collect(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (_plot(variants, out_dir, "file_mib", "mean_score", "file size (MiB)", "mean task score",
                                "accuracy-vs-size.png"),
                         _plot(variants, out_dir, "decode_tok_s", "mean_score", "decode tokens/s (batch 1)",
                                "mean task score", "accuracy-vs-speed.png"),
                         _plot(variants, out_dir, "bits", "perplexity", "bits per weight", "perplexity",
                                "perplexity-vs-bits.png")) if p]
    tasks = sorted({t for v in variants.values() for t in v.scores})
    lines = ["# Model variants", "", "| variant | mean score | " + " | ".join(tasks) +
             " | file MiB | decode tok/s | perplexity | bits |",
             "|---" * (len(tasks) + 6) + "|"]
    for v in sorted(variants.values(), key=lambda v: v.name):
        cells = [v.name, _fmt(v.mean_score, 4)] + [_fmt(v.scores.get(t), 4) for t in tasks]
        cells += [_fmt(v.file_mib, 1), _fmt(v.decode_tok_s, 1), _fmt(v.perplexity, 3), _fmt(v.bits, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean score: the unweighted mean of each task's primary metric (acc_norm where the task has it, "
              "else acc, exact match or pass@1).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _plot(variants: dict[str, Variant], out_dir: Path, x: str, y: str, xlabel: str, ylabel: str,
          name: str) -> Path | None:
    points = [(getattr(v, x), getattr(v, y), v.name) for v in variants.values()
              if getattr(v, x) is not None and getattr(v, y) is not None]
    return save_png(scatter(points, xlabel, ylabel), out_dir / name) if points else None

"""A pipeline's report: one table row per model-producing stage, and the plots that let a person
choose between the stages (quality vs file size, quality vs decode speed, each training run's loss).

`write_report` writes two views of the same content into the pipeline's directory:
report.html, one self-contained page (inline CSS, plots as inline SVG, no scripts, nothing
fetched), and report.md with the plots as PNG files under plots/. `markdown_table` is the
table alone, which the model card reuses.

A row is a plain dict (see `write_report`); every value may be missing or None, and shows as "–".
This module measures nothing and reads no model: rows come from the pipeline's evaluation.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.fileio import write_text
from slmkit.plots import inline_svg, loss_curves, save_png, scatter
from slmkit.sizing import human_count
from slmkit.train.plot import read_metrics

MISSING = "–"  # what an absent value shows as, in both views

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { white-space: normal; }
th:first-child, td:first-child, #answers th, #answers td { text-align: left; }
#answers td { white-space: normal; }
thead th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; }
figure svg { max-width: 100%; height: auto; }
.skipped { color: #777; font-style: italic; }
""".strip()


# --- cell formatting -----------------------------------------------------------------------------

def _params(n: float | None) -> str:
    return MISSING if n is None else human_count(n, 1)


def _number(value: float | None, digits: int, unit: str = "") -> str:
    return MISSING if value is None else f"{value:,.{digits}f}{unit}"


def _metric(value: float | None, stderr: float | None = None) -> str:
    """0.927 ± 0.019; the stderr is what says whether two stages differ at all."""
    if value is None:
        return MISSING
    return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


# --- the table -----------------------------------------------------------------------------------

def _task(row: dict) -> dict:
    return row.get("task") or {}


def _general(row: dict) -> dict[str, dict]:
    return {name: entry or {} for name, entry in (row.get("general") or {}).items()}


def _ordered(names: Iterable[str]) -> list[str]:
    """Distinct names in first-seen order (stage order, then each row's own order)."""
    return list(dict.fromkeys(names))


def _metric_name(rows: list[dict], pick: Callable[[dict], dict]) -> str:
    """The metric a column shows (acc, acc_norm...), from the first row that names it."""
    return next((pick(r)["metric"] for r in rows if pick(r).get("metric")), "")


def _columns(rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) for every column: the fixed ones, then one per task and per general benchmark,
    named after what the rows actually hold."""
    columns = [("stage", lambda r: str(r.get("stage") or MISSING)),
               ("parameters", lambda r: _params(r.get("params"))),
               ("file size", lambda r: _number(r.get("file_mib"), 1, " MiB")),
               ("peak RSS", lambda r: _number(r.get("peak_rss_mib"), 0, " MiB")),
               ("prefill tok/s", lambda r: _number(r.get("prefill_tps"), 1)),
               ("decode tok/s", lambda r: _number(r.get("decode_tps"), 1))]
    def task(name: str) -> Callable[[dict], dict]:
        return lambda r: _task(r) if _task(r).get("name") == name else {}

    def bench(name: str) -> Callable[[dict], dict]:
        return lambda r: _general(r).get(name, {})
    picks = [(name, task(name)) for name in _ordered(_task(r)["name"] for r in rows if _task(r).get("name"))]
    picks += [(name, bench(name)) for name in _ordered(name for r in rows for name in _general(r))]
    for name, pick in picks:
        counts = {pick(r).get("n") for r in rows if pick(r).get("value") is not None}
        same = len(counts) == 1 and None not in counts  # one count for the column: said once, in its header
        header = f"{name} {_metric_name(rows, pick)}".strip() + (f" ({counts.pop()} rows)" if same else "")
        columns.append((header, lambda r, pick=pick, same=same: _metric(pick(r).get("value"), pick(r).get("stderr"))
                        + ("" if same or pick(r).get("n") is None else f" (n={pick(r)['n']})")))
    columns += [("hallucination rate", lambda r: _percent(r.get("hallucination_rate"))),
                ("wall time", lambda r: _duration(r.get("wall_s")))]
    return columns


def stage_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cell texts (unescaped), one list per row, for any output format."""
    columns = _columns(rows)
    return [h for h, _ in columns], [[cell(r) for _, cell in columns] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    """The stage table as GitHub-flavoured markdown (used by report.md and the model card)."""
    headers, cells = stage_table(rows)
    return _markdown(headers, cells, ["---"] + ["---:"] * (len(headers) - 1))


def _answer_table(answers: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Held-out questions: question, expected answer, then one column per model that answered."""
    headers = _ordered(k for a in answers for k in ("question", "expected", *a))
    return headers, [[" ".join(str(a.get(h) or MISSING).split()) for h in headers] for a in answers]


def _markdown(headers: list[str], cells: list[list[str]], align: list[str] | None = None) -> str:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
    align = align or ["---"] * len(headers)
    return "\n".join([line(headers), "|" + "|".join(align) + "|"] + [line(c) for c in cells])


def _html(headers: list[str], cells: list[list[str]], id: str) -> str:
    esc = html.escape
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in c) + "</tr>\n" for c in cells)
    return (f'<div class="scroll"><table id="{id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n'
            '</table></div>')


# --- what the plots show -------------------------------------------------------------------------

@dataclass
class Plot:
    """One plot: `figure` is None when there was nothing to draw, and `skipped` then says why."""
    id: str  # the SVG's id in report.html; also the PNG's file name (plots/<id>.png)
    title: str
    figure: object | None = None
    skipped: str = ""


def _quality(rows: list[dict]) -> tuple[str, Callable[[dict], float | None]]:
    """The y axis of both quality plots, one measure for every stage so the points compare: the task
    metric when a stage has one, else the mean of the general benchmarks every scored stage has."""
    task = next((_task(r) for r in rows if _task(r).get("value") is not None), None)
    return _task_quality(task) if task else _general_quality(rows)


def _task_quality(task: dict) -> tuple[str, Callable[[dict], float | None]]:
    def value(r: dict) -> float | None:
        return _task(r).get("value") if _task(r).get("name") == task.get("name") else None
    return f"{task.get('name') or 'task'} {task.get('metric') or 'score'}", value


def _general_quality(rows: list[dict]) -> tuple[str, Callable[[dict], float | None]]:
    def scores(r: dict) -> dict[str, float]:
        return {k: v["value"] for k, v in _general(r).items() if v.get("value") is not None}
    scored = [set(scores(r)) for r in rows if scores(r)]
    shared = sorted(set.intersection(*scored)) if scored else []  # a mean over other benchmarks would not compare
    def mean(r: dict) -> float | None:
        values = [scores(r)[k] for k in shared if k in scores(r)]
        return sum(values) / len(values) if values and len(values) == len(shared) else None
    return f"mean of {', '.join(shared) or 'general benchmarks'}", mean


def _points(rows: list[dict], x_key: str, y: Callable[[dict], float | None]) -> list[tuple[float, float, str, str]]:
    """(x, y, stage, colour) of each stage that has both; a stage keeps its colour in every plot."""
    return [(r[x_key], y(r), str(r.get("stage")), f"C{i % 10}") for i, r in enumerate(rows)
            if r.get(x_key) is not None and y(r) is not None]


def _quality_plot(rows: list[dict], id: str, title: str, x_key: str, xlabel: str) -> Plot:
    ylabel, quality = _quality(rows)
    points = _points(rows, x_key, quality)
    if not points:
        return Plot(id, title, skipped=f"skipped: no stage has both a quality score and {xlabel}")
    return Plot(id, title, figure=scatter(points, xlabel, ylabel, title, path_line=True))


def _curve_plot(stage: str, run: Path) -> Plot:
    id, title = f"plot-curves-{_slug(stage)}", f"Training curves: {stage}"
    try:
        train, evals = read_metrics(Path(run))
    except SlmError as e:
        return Plot(id, title, skipped=f"skipped: {e}")
    train = [r for r in train if r.get("loss") is not None]
    if not train:
        return Plot(id, title, skipped=f"skipped: '{run}/metrics.jsonl' has no training steps")
    return Plot(id, title, figure=loss_curves(train, evals, title))


def _slug(text: str) -> str:
    """A stage name as an HTML id / file name part (they are already tame: 03-finetune)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "stage"


def _plots(rows: list[dict], curves: dict[str, Path]) -> list[Plot]:
    return [_quality_plot(rows, "plot-quality-size", "Quality vs file size", "file_mib", "file size (MiB)"),
            _quality_plot(rows, "plot-quality-speed", "Quality vs decode speed", "decode_tps", "decode tokens/s"),
            *(_curve_plot(stage, run) for stage, run in curves.items())]


# --- the two pages -------------------------------------------------------------------------------

LEGEND = f'Missing values show as "{MISSING}". Task and benchmark scores are value ± standard error.'
ANSWERS = "Held-out questions, answered greedily"


def _html_page(title: str, rows: list[dict], plots: list[Plot], svgs: dict[str, str], notes: list[str],
               answers: list[dict]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title>", f"<style>\n{CSS}\n</style>", "</head>", "<body>",
             f"<h1>{esc(title)}</h1>", "<h2>Stages</h2>", _html(*stage_table(rows), "stages"), f"<p>{esc(LEGEND)}</p>"]
    for plot in plots:
        parts.append(f"<h2>{esc(plot.title)}</h2>")
        parts.append(f"<figure>{svgs[plot.id]}</figure>" if plot.id in svgs
                     else f'<p class="skipped" id="{plot.id}-skipped">{esc(plot.skipped)}</p>')
    if answers:
        parts += [f"<h2>{esc(ANSWERS)}</h2>", _html(*_answer_table(answers), "answers")]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>", *(f"<li>{esc(n)}</li>" for n in notes), "</ul>"]
    return "\n".join(parts + ["</body>", "</html>"]) + "\n"


def _markdown_page(title: str, rows: list[dict], plots: list[Plot], notes: list[str], answers: list[dict]) -> str:
    lines = [f"# {title}", "", markdown_table(rows), "", LEGEND, ""]
    for plot in plots:
        lines += [f"## {plot.title}", ""]
        lines += [f"![{plot.title}](plots/{plot.id}.png)" if plot.figure is not None else f"*{plot.skipped}*", ""]
    if answers:
        lines += [f"## {ANSWERS}", "", _markdown(*_answer_table(answers)), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def _draw(plots: list[Plot], out_dir: Path) -> dict[str, str]:
    """Each drawn plot as inline SVG (returned, by id) and as out_dir/plots/<id>.png."""
    svgs = {}
    for plot in plots:
        if plot.figure is not None:
            svgs[plot.id] = inline_svg(plot.figure, plot.id, plot.title)
            save_png(plot.figure, out_dir / "plots" / f"{plot.id}.png")
    return svgs


def write_report(out_dir: Path, title: str, rows: list[dict], curves: dict[str, Path],
                 notes: Iterable[str] = (), answers: Iterable[dict] = ()) -> tuple[Path, Path]:
    """Write out_dir/report.html and out_dir/report.md (plots in out_dir/plots/*.png); return both.

    rows: one dict per model-producing stage, in pipeline order, with any of the keys stage, params,
    file_mib, peak_rss_mib, prefill_tps, decode_tps, task {name, metric, value, stderr},
    general {benchmark: {metric, value[, stderr]}}, hallucination_rate (0..1), wall_s.
    curves: stage name -> its training run directory (the one holding metrics.jsonl).
    answers: held-out questions, each {"question", "expected", <model label>: answer, ...}.
    """
    out_dir, notes, answers = Path(out_dir), list(notes), list(answers)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, curves)
    svgs = _draw(plots, out_dir)
    html_file, md_file = out_dir / "report.html", out_dir / "report.md"
    page = _html_page(title, rows, plots, svgs, notes, answers)
    write_text(html_file, page)
    markdown = _markdown_page(title, rows, plots, notes, answers)
    write_text(md_file, markdown)
    return html_file, md_file

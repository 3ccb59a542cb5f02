"""The console's view of a finished pipeline: the stage table and the final model's answers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(rows: list[dict], answers: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="what each stage did (held-out rows only)")
    task = next((r["task"] for r in rows if r.get("task")), None)
    columns = ["stage", "params", "size MiB", "peak RSS MiB", "decode tok/s"]
    columns += [f"{task['name']} {task['metric']}", "hallucination"] if task else []
    for column in columns:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for r in rows:
        cells = [r["stage"], _cell(r.get("params") and r["params"] / 1e6, ".1f") + ("M" if r.get("params") else ""),
                 _cell(r.get("file_mib"), ".1f"), _cell(r.get("peak_rss_mib"), ".0f"), _cell(r.get("decode_tps"), ".1f")]
        if task:
            cells += [_cell((r.get("task") or {}).get("value"), ".1%"), _cell(r.get("hallucination_rate"), ".1%")]
        table.add_row(*cells)
    console.print(table)
    for answer in answers:
        console.print(f"[bold cyan]user>[/] {answer['question']}")
        for label, text in answer.items():
            if label not in ("question", "expected"):
                console.print(f"[bold]{label}>[/] {text}")
        console.print(f"[dim](answer in the data: {answer['expected']})[/]")

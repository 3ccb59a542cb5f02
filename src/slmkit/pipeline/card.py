"""The model card a pipeline leaves beside its final model: model_dir/README.md in the Hugging Face
format, so the directory can be uploaded to the Hub as it is.

Front matter (YAML) carries what the Hub indexes: library, base model, tags and the final model's
measured results in the `model-index` schema. The body says what the model is, how the pipeline
made it (its YAML verbatim), the stage table (the report's own markdown table), how to run it and
what its numbers do and do not mean. Nothing is measured here; the numbers come from the rows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from slmkit.errors import SlmError
from slmkit.fileio import write_text
from slmkit.pipeline.report import markdown_table
from slmkit.sizing import human_count

TAGS = ["slmkit", "small-language-model"]


def _final_row(rows: list[dict], final_stage: str) -> dict:
    for row in rows:
        if row.get("stage") == final_stage:
            return row
    stages = ", ".join(str(r.get("stage")) for r in rows) or "none"
    raise SlmError(f"no evaluation row for the final stage '{final_stage}' (rows: {stages}); "
                   "evaluate that stage or name one that was evaluated")


def _result(task: str, metric: str, value: float) -> dict:
    """One entry of a model-index `results` list (the Hub's schema: task, dataset, metrics)."""
    return {"task": {"type": "text-generation"},
            "dataset": {"name": task, "type": task},
            "metrics": [{"type": metric, "value": float(value), "name": f"{task} {metric}"}]}


def model_index_results(row: dict) -> list[dict]:
    """The row's task and general benchmark scores as model-index results (missing ones left out)."""
    task = row.get("task") or {}
    scores = [(task.get("name"), task.get("metric"), task.get("value"))]
    scores += [(name, (e or {}).get("metric"), (e or {}).get("value")) for name, e in (row.get("general") or {}).items()]
    return [_result(name, metric or "score", value) for name, metric, value in scores
            if name and value is not None]


FILES = ("gguf", "lora_gguf", "base_gguf")  # keys of `extra` that name deployable files, not front matter


def front_matter(name: str, base_model: str, row: dict, extra: dict | None = None) -> dict:
    """The card's YAML header. `extra` adds keys (license, language, datasets...): its tags are
    appended to slmkit's, any other key replaces the default one; the file keys (FILES) are not
    front matter and are left out."""
    extra = {k: v for k, v in (extra or {}).items() if k not in FILES}
    tags = TAGS + [t for t in extra.pop("tags", []) if t not in TAGS]
    meta = {"library_name": "slmkit", "base_model": base_model, "tags": tags, "pipeline_tag": "text-generation"}
    results = model_index_results(row)
    if results:  # the Hub rejects a model-index without results
        meta["model-index"] = [{"name": name, "results": results}]
    return {**meta, **extra}


def _fence(text: str, lang: str) -> str:
    """A code block whose fence is longer than any backtick run inside, so the text stays verbatim."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _summary(name: str, base_model: str, rows: list[dict], row: dict) -> list[str]:
    facts = [f"{human_count(row['params'], 1)} parameters" if row.get("params") else "",
             f"{row['file_mib']:.1f} MiB on disk" if row.get("file_mib") is not None else ""]
    task = row.get("task") or {}
    if task.get("value") is not None:
        facts.append(f"{task.get('metric') or 'score'} {task['value']:.3f} on held-out {task.get('name')} rows")
    stages = " → ".join(str(r.get("stage")) for r in rows)
    return [f"# {name}", "",
            f"**{name}** is a small language model made with slmkit from "
            f"`{base_model}`, by the pipeline {stages}; this is the model of stage `{row.get('stage')}`"
            + (f" ({', '.join(f for f in facts if f)})." if any(facts) else "."), ""]


def _how_made(rows: list[dict], pipeline_yaml: str) -> list[str]:
    stages = [f"{i}. `{r.get('stage')}`" + (f" → `{r['model']}`" if r.get("model") else "")
              for i, r in enumerate(rows, 1)]
    return ["## How it was made", "", "Each stage starts from the model of the one before it:", "", *stages, "",
            "The pipeline, verbatim (`slm pipeline` reruns it):", "", _fence(pipeline_yaml, "yaml"), ""]


def _results(rows: list[dict], final_stage: str) -> list[str]:
    return ["## Measured results", "",
            f"One row per stage; this model is `{final_stage}`. Missing values (\"–\") were not measured "
            "for that stage. Scores are value ± standard error.", "", markdown_table(rows), ""]


def _relative(file: str, model_dir: Path) -> str:
    """`file` as seen from the directory that holds model_dir (where the usage commands run)."""
    return os.path.relpath(file, model_dir.parent)


def _llama_cpp(model_dir: Path, files: dict) -> list[str]:
    """llama.cpp commands for the GGUF files the export wrote (or how to write one)."""
    if files.get("gguf"):
        commands = [f"llama-cli -m {_relative(files['gguf'], model_dir)} -cnv"]
    else:
        commands = [f"slm export gguf {model_dir.name} model.gguf --type q8_0", "llama-cli -m model.gguf -cnv"]
    if files.get("lora_gguf") and files.get("base_gguf"):
        commands.append(f"llama-cli -m {_relative(files['base_gguf'], model_dir)} "
                        f"--lora {_relative(files['lora_gguf'], model_dir)} -cnv   # base + adapter")
    return commands


def _usage(model_dir: Path, files: dict) -> list[str]:
    serve = f"slm serve {model_dir.name}={model_dir.name}   # OpenAI-compatible API, chat page at http://127.0.0.1:8000/"
    return ["## How to use it", "", "With slmkit installed, from the directory that holds this one:", "",
            _fence(f"slm chat {model_dir.name}\n{serve}", "bash"), "",
            "With llama.cpp, from the GGUF export:", "", _fence("\n".join(_llama_cpp(model_dir, files)), "bash"), ""]


LIMITATIONS = """## Limitations

- Task scores are measured on held-out rows that no stage trained or tuned on; they estimate how the
  model does on more rows like them, not on other tasks or on data from elsewhere. The ± is one
  standard error: stages whose scores differ by less than about two of them may not differ at all.
- General benchmarks are small multiple-choice suites that show what the pipeline cost in general
  ability; they are not a measure of fitness for any use.
- Hallucination rate: of the answers that should name one label of the task's closed set, the share
  that name none. It counts invented labels, not wrong ones (a wrong label is an error in the task
  score), so a low rate does not mean the answers are right.
- Speed and memory were measured on the machine that ran the pipeline, every stage alike; they
  compare the stages with each other, other hardware gives other numbers.
- A small model is wrong often and confidently, and keeps the biases of its base model and data. Do
  not use it where a wrong answer harms someone (a medical diagnosis, for one) without a person
  checking each answer.
"""


def write_model_card(model_dir: Path, name: str, base_model: str, pipeline_yaml: str, rows: list[dict],
                     final_stage: str, extra: dict | None = None) -> Path:
    """Write model_dir/README.md (atomically) for the model of `final_stage` and return its path.

    rows: the report's rows (see slmkit.pipeline.report.write_report), in pipeline order; the row of
    `final_stage` fills the model-index. extra: the export's files ("gguf", "lora_gguf", "base_gguf":
    paths, shown in the llama.cpp commands) and any further front-matter keys (see `front_matter`).
    """
    model_dir = Path(model_dir)
    row = _final_row(rows, final_stage)
    header = yaml.safe_dump(front_matter(name, base_model, row, extra), sort_keys=False, allow_unicode=True)
    body = (_summary(name, base_model, rows, row) + _how_made(rows, pipeline_yaml)
            + _results(rows, final_stage) + _usage(model_dir, extra or {}) + [LIMITATIONS])
    text = f"---\n{header}---\n\n" + "\n".join(body)
    file = model_dir / "README.md"
    write_text(file, text)
    return file

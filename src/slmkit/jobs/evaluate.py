"""`slm eval` and `slm bench` as jobs: score a model on tasks (lm-evaluation-harness formats) or a
text's perplexity, and measure its latency and memory in a fresh process."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from slmkit.errors import SlmError
from slmkit.evals.api import class_table, evaluate, model_info, parse_shots, results_table, save_results
from slmkit.evals.device import SWEEP_PRESETS, BenchSettings, ModelBench, bench_table, measure, sweep_plot
from slmkit.evals.endpoint import EndpointLM
from slmkit.evals.lm import LlamaCppLM, LocalLM
from slmkit.evals.perplexity import text_perplexity
from slmkit.evals.tasks import DEFAULT_SUITE, TASKS
from slmkit.evals.tasks.harness_yaml import harness_tasks
from slmkit.evals.tasks.userfile import KINDS, user_task
from slmkit.fileio import write_text
from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, gguf_kind, runtime_files
from slmkit.load import load
from slmkit.plots import confusion_plot, save_png
from slmkit.presets import DEFAULT_MODEL
from slmkit.runtime import Runtime, use_threads


@dataclass
class EvalJob:
    model: str = DEFAULT_MODEL
    """GGUF file, HF directory, adapter directory or the bundled model (with `endpoint`: the served model's name)"""
    tasks: str | None = None
    """comma-separated tasks (default: the suite hellaswag,arc_easy,arc_challenge,piqa,winogrande,boolq,mmlu,gsm8k, under an hour for a 135M model); `list` shows them all"""
    shots: str | None = None
    """few-shot examples, e.g. 0 or 0,5 (default: each task's own: 0, and 5 for gsm8k); several values report the gain"""
    data: str | None = field(default=None, metadata={"metavar": "FILE.jsonl"})
    """your own rows: a JSONL of chats (`messages`) or `prompt` rows, with a `label` (classification) or references / the answer (generation), formatted as slm finetune trains them; the answers go to a JSONL beside the results"""
    data_kind: str = field(default="auto", metadata={"choices": KINDS})
    """--data: classification (accuracy, macro-F1, per-class scores, confusion matrix), generation (ROUGE, exact match, chrF) or auto (labels, or few distinct answers, mean classification)"""
    train_data: str | None = field(default=None, metadata={"metavar": "FILE.jsonl"})
    """--data: the file the model was fine-tuned on: an evaluated label it never shows is refused before work, and --shots draws from it"""
    include_path: str | None = field(default=None, metadata={"metavar": "DIR"})
    """a folder of lm-evaluation-harness task YAMLs (multiple_choice, generate_until) over local json/csv files; name their tasks in --tasks"""
    data_max_tokens: int = 256
    """--data generation: new tokens per answer (SciTLDR's built-in task uses 96)"""
    limit: int | None = None
    """score only the first N documents of each task (MMLU: of each subject); the default suite uses its own limits (see README), other tasks default to all documents"""
    full: bool = False
    """the default suite on every document (hours, not minutes)"""
    batch_size: int = 8
    """rows per forward pass (results do not depend on it)"""
    seed: int = 1234
    """seed of the few-shot draws"""
    data_dir: str | None = None
    """evaluation data folder (default: ../shared/data/eval)"""
    perplexity: str | None = field(default=None, metadata={"metavar": "FILE"})
    """instead of tasks: perplexity and bits per byte of this text file (sliding window)"""
    stride: int | None = None
    """perplexity: new tokens per window (default: half the context)"""
    endpoint: str | None = field(default=None, metadata={"metavar": "URL"})
    """score the model served at this OpenAI-compatible URL instead (e.g. http://127.0.0.1:8000); the key comes from $OPENAI_API_KEY"""
    output: str | None = field(default=None, metadata={"flag": ("-o", "--output")})
    """results JSON (default: runs/eval/<model>-<time>.json)"""
    runtime: Runtime = field(default_factory=lambda: Runtime(engine="torch", dtype="float32"))
    """where it is scored: torch by default (an evaluation measures the weights as they are, not a Q8_0 copy of them); llamacpp scores the GGUF export, its rounding included"""


@dataclass
class BenchJob:
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    """GGUF files, HF directories or preset names (presets run with random weights)"""
    settings: BenchSettings = field(default_factory=lambda: BenchSettings(runtime=Runtime(engine="auto", dtype="float32")))
    """what is measured and how"""
    sweep: bool = False
    """also measure the presets smollm2-135m, openelm-270m, smollm2-360m, qwen2-0.5b, llama-3.2-1b and plot decode speed against size"""
    output: str | None = field(default=None, metadata={"flag": ("-o", "--output")})
    """results JSON (default: runs/bench/bench-<time>.json)"""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def eval_output(job: EvalJob) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(job.model).name) or "model"
    return Path(job.output or Path("runs") / "eval" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def task_plan(job: EvalJob) -> tuple[list[str], list[int] | None, int | dict | None]:
    """(task names, shot counts, limit) the job asks for; bad values are refused before any work."""
    shots = parse_shots(job.shots)
    suite = "" if job.data else ",".join(DEFAULT_SUITE)  # --data alone scores the file alone
    names = [t.strip() for t in (job.tasks or suite).split(",") if t.strip()]
    limit = job.limit
    if limit is None and not job.tasks and not job.data and not job.full:
        limit = dict(DEFAULT_SUITE)
    return names, shots, limit


def run_eval(job: EvalJob, progress: bool = True) -> dict:
    """The results document (also written to `eval_output(job)`, and after each task while running)."""
    use_threads(job.runtime.threads)
    names, shots, limit = task_plan(job)
    out = eval_output(job)
    if job.include_path:  # the harness YAMLs' tasks by name, read and checked before any model loads
        harness = harness_tasks(job.include_path)
        names = [harness.get(n, n) for n in names]
    if job.data:  # read and checked before any model loads
        names = names + [user_task(job.data, job.data_kind, job.train_data, job.data_max_tokens)]
    elif job.train_data:
        raise SlmError("--train-data goes with --data (the file to score)")
    if job.endpoint:
        if job.perplexity:
            raise SlmError("perplexity needs the model's weights here; it does not work with an endpoint")
        lm = EndpointLM(job.endpoint, job.model, os.environ.get("OPENAI_API_KEY"))
        doc = evaluate(lm, names, shots, limit, job.seed, job.data_dir, progress, f"{job.endpoint} {job.model}")
    elif job.perplexity:
        choose_engine(job.runtime.engine, job.model, ["--perplexity"])  # refuses the llamacpp engine in one line
        loaded = _eval_model(job.model, job.runtime.dtype)
        result = text_perplexity(loaded.model, loaded.tokenizer, job.perplexity, stride=job.stride)
        print(result.summary())
        doc = {"model": job.model, "model_info": model_info(loaded),
               "perplexity": {**result.__dict__, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}}
    else:
        lm, info = eval_lm(job.model, job.runtime, job.batch_size)
        doc = evaluate(lm, names, shots, limit, job.seed, job.data_dir, progress, job.model,
                       on_result=lambda partial: save_results({**partial, "model_info": info, "partial": True}, out))
        doc["model_info"] = info
    save_results(keep_answers(doc, out), out)
    return doc


def keep_answers(doc: dict, out: Path) -> dict:
    """Each --data result's answers moved out of `doc` into OUT.answers.jsonl (one row per
    document: where, expected, the model's answer and its scores) and its confusion matrix drawn
    beside it; the results JSON names both files."""
    for r in doc.get("results", []):
        answers = r["extra"].pop("answers", None)
        if answers is None:
            continue
        path = out.with_suffix(".answers.jsonl")
        write_text(path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
        r["extra"]["answers_file"] = str(path)
        if "confusion" in r["extra"]:
            r["extra"]["confusion_plot"] = str(save_png(confusion_plot(r["extra"]["confusion"], r["extra"]["labels"],
                                                                       r["task"]), out.with_suffix(".confusion.png")))
    return doc


def _eval_model(spec: str, dtype: str):
    loaded = load(spec, dtype=getattr(torch, dtype), merge=True)
    if loaded.tokenizer is None:
        raise SlmError("this model has no tokenizer; evaluation reads text (load a GGUF or an HF directory "
                       "with tokenizer.json)")
    return loaded


def eval_lm(model: str, r: Runtime, batch_size: int = 8):
    """The scorer of MODEL on the runtime's engine, and what a report needs to know of the model."""
    if choose_engine(r.engine, model) == "llamacpp":
        files = runtime_files(model, r.gguf_type, progress=_stderr)
        engine = LlamaCppEngine.for_files(files, r.context, threads=r.threads)
        size = files.file_bytes
        return LlamaCppLM(engine, files.tokenizer), {
            "params": engine.parameters, "file_mib": size / 2**20, "bits": round(8 * size / engine.parameters, 2),
            "quantization": None, "gguf_type": gguf_kind(files.gguf, r.gguf_type).upper(),
            "engine": "llamacpp"}
    loaded = _eval_model(model, r.dtype)
    return LocalLM(loaded.model, loaded.tokenizer, batch_size=batch_size), model_info(loaded)


def eval_verb(job: EvalJob) -> None:
    """`slm eval`: score, print the table, say where the results went (`--tasks list`: the task names)."""
    if job.tasks == "list":
        print("tasks: " + ", ".join(TASKS) + ", mmlu_SUBJECT (one MMLU subject, e.g. mmlu_anatomy), NAME:val (a "
              "fine-tuning task's validation split, e.g. symptom2disease:val)")
        return
    job = replace(job, output=str(eval_output(job)))  # one path, said at the end
    doc = run_eval(job)
    if "results" in doc:
        console = Console()
        console.print(results_table(doc))
        for r in doc["results"]:
            if "per_class" in r["extra"]:
                console.print(class_table(r))
            for key in ("answers_file", "confusion_plot"):
                if key in r["extra"]:
                    print(f"wrote {r['extra'][key]}")
    print(f"wrote {job.output}")


def bench_verb(job: BenchJob) -> None:
    results, out = run_bench(job, log=lambda message: print(message, flush=True))
    Console().print(bench_table(results, job.settings))
    print(f"wrote {out}")
    if job.sweep:
        print(f"wrote {sweep_plot(results, out.with_suffix('.png'))}")


def check_bench(job: BenchJob) -> list[str]:
    """The models to measure; bad settings are refused before any process starts."""
    s = job.settings
    s.check()
    models = list(dict.fromkeys(job.models + (list(SWEEP_PRESETS) if job.sweep else [])))
    if s.runtime.engine == "llamacpp":
        for spec in models:  # a missing extra or an architecture without weights: one line, before any process
            choose_engine(s.runtime.engine, spec)
    return models


def run_bench(job: BenchJob, log=print) -> tuple[list[ModelBench], Path]:
    """Measure each model in its own process; write the results JSON; return them and its path."""
    models = check_bench(job)
    results = []
    for spec in models:
        log(f"measuring {spec} ...")
        results.append(measure(spec, job.settings))
    out = Path(job.output or Path("runs") / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    doc = {"settings": asdict(job.settings), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "results": [asdict(r) for r in results]}
    save_results(json.loads(json.dumps(doc)), out)
    return results, out


EVAL_EXAMPLES = """examples:
  slm eval --tasks list
  slm eval smollm2-135m-instruct --tasks arc_easy,piqa --limit 200      # a quick look (~2 min)
  slm eval smollm2-135m-instruct                                         # the whole suite (see README)
  slm eval runs/smollm2-gptq --tasks mmlu --shots 0,5                    # the in-context-learning gain
  slm eval smollm2-135m-instruct --perplexity ../shared/data/corpus/wikitext2/valid.txt
  slm eval runs/s2d-lora --tasks symptom2disease        # a fine-tuned model on its task's test split
  slm eval runs/s2d-lora --tasks symptom2disease:val    # ... on the validation split, to choose settings
  slm eval runs/my-lora --data my_test.jsonl --train-data my_train.jsonl   # your own held-out rows
  slm eval runs/my-lora --include-path my_tasks/ --tasks my_task            # lm-evaluation-harness YAMLs

Prompt formats and metrics follow lm-evaluation-harness (each task's docstring quotes them);
results do not depend on --batch-size and are the same on every run.
"""

BENCH_EXAMPLES = """examples:
  slm bench                                                   # the bundled SmolLM2-135M
  slm bench smollm2-135m-instruct runs/smollm2-int8 --batch 1,8
  slm bench --sweep --prompt-tokens 128 --new-tokens 32       # how architecture changes latency here

Each model is measured in its own process (its own peak memory and load time); one warm-up run is
excluded and the median of --runs is reported with its min and max.
"""

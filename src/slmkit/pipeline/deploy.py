"""The export stage: the final model as an HF directory (with a model card), as one GGUF, and --
when fine-tuning made an adapter -- as its base's GGUF plus a llama.cpp LoRA file; optionally also
as an ExecuTorch program and an ONNX Runtime GenAI directory. Then proof that the files run: the
final GGUF is scored on the task and timed in llama.cpp (a report row of its own), the phone
exports are timed on their own runtimes (a row each), and a few held-out questions are answered by
the GGUF and by base + adapter in llama.cpp.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from slmkit.data.tasks import TASKS, task_data
from slmkit.errors import SlmError
from slmkit.generate import TextGenerator
from slmkit.infer import llamacpp
from slmkit.infer.llamacpp import LlamaCppEngine, runtime_files
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.peft import is_adapter_dir, read_adapter
from slmkit.jobs.evaluate import run_eval
from slmkit.jobs.export import (
    GgufJob,
    GgufLoraJob,
    run_executorch,
    run_gguf,
    run_gguf_lora,
    run_litert,
    run_onnx,
    save_whole,
)
from slmkit.load import find_base, load
from slmkit.pipeline.config import EvaluateStage, ExportStage
from slmkit.pipeline.measure import speed_cells, task_cells
from slmkit.runtime import Runtime

Log = Callable[[str], object]


def on_llamacpp(runtime: Runtime) -> Runtime:
    return dataclasses.replace(runtime, engine="llamacpp")


def export_files(final: str, finetune_dir: str | None, cfg: ExportStage, name: str, out: Path, log: Log) -> dict:
    """Write the deployable files; returns their paths (and why an adapter file was not written)."""
    outputs: dict = {"model": final}
    if cfg.hf:
        outputs["hf"] = str(save_whole(final, out / "hf", log))
    gguf = dataclasses.replace(cfg.gguf, model=final, out=str(out / f"{name}-{cfg.gguf.type}.gguf"))
    outputs["gguf"] = str(run_gguf(gguf, log))
    if cfg.adapter and finetune_dir and is_adapter_dir(Path(finetune_dir)):
        outputs.update(_adapter_files(finetune_dir, cfg, name, out, log))
    phones = {"executorch": (run_executorch, ".pte"), "onnx": (run_onnx, ""), "litert": (run_litert, ".tflite")}
    for key, (run, suffix) in phones.items():
        job = getattr(cfg, key)
        if job is not None:  # force: a resumed stage writes its files again
            target = out / f"{name}-{key}-{job.precision}{suffix}"
            outputs[key] = str(run(dataclasses.replace(job, model=final, out=str(target), force=True), log))
    return outputs


def phone_rows(outputs: dict, cfg: ExportStage, evaluate: EvaluateStage | None, stage: str) -> list[dict]:
    """A report row per phone export, timed on its own runtime at batch 1 (`slm bench` on the file)."""
    if evaluate is None or evaluate.bench is None:
        return []
    runtime = dataclasses.replace(evaluate.bench.runtime, engine="auto")
    bench = dataclasses.replace(evaluate.bench, batches=(1,), runtime=runtime)
    names = {"executorch": "ExecuTorch", "onnx": "ONNX Runtime GenAI", "litert": "LiteRT"}
    return [{"stage": f"{stage} ({names[key]} {getattr(cfg, key).precision})", "model": outputs[key],
             **speed_cells(outputs[key], bench)} for key in names if outputs.get(key)]


def _adapter_files(adapter: str, cfg: ExportStage, name: str, out: Path, log: Log) -> dict:
    base = find_base(read_adapter(Path(adapter)))
    try:
        lora = run_gguf_lora(GgufLoraJob(adapter=adapter, out=str(out / f"{name}-lora.gguf")), log)
    except SlmError as err:  # DoRA magnitudes, a tied head: llama.cpp cannot apply those
        log(f"no llama.cpp adapter: {err}")
        return {"adapter_skipped": str(err)}
    base_gguf = run_gguf(GgufJob(model=base, out=str(out / f"{name}-base-{cfg.adapter_base_type}.gguf"),
                                 type=cfg.adapter_base_type), log)
    return {"lora_gguf": str(lora), "base_gguf": str(base_gguf)}


def check_in_llamacpp(outputs: dict, cfg: ExportStage, evaluate: EvaluateStage | None, task: str | None,
                      out: Path, stage: str) -> tuple[dict | None, list[dict]]:
    """(a report row for the final GGUF run by llama.cpp, answers to held-out questions), or
    (None, []) when llama.cpp is not installed."""
    if not cfg.check or not llamacpp.available():
        return None, []
    row: dict = {"stage": f"{stage} (GGUF {cfg.gguf.type.upper()}, llama.cpp)", "model": outputs["gguf"]}
    if evaluate is not None and task:
        job = dataclasses.replace(evaluate.eval, model=outputs["gguf"], limit=evaluate.task_limit, **evaluate.task_job(task),
                                  runtime=on_llamacpp(evaluate.eval.runtime), output=str(out / "gguf-task.json"))
        row.update(task_cells(task, run_eval(job)))
    if evaluate is not None and evaluate.bench is not None:
        bench = dataclasses.replace(evaluate.bench, runtime=on_llamacpp(evaluate.bench.runtime))
        row.update(speed_cells(outputs["gguf"], bench))
    answers = _answers(outputs, task, cfg.answers)
    return row, answers


def _answers(outputs: dict, task: str | None, count: int) -> list[dict]:
    """Held-out test questions of the task answered greedily by the final GGUF (and by base +
    adapter, when there is one) in llama.cpp."""
    runtimes = {"final GGUF": runtime_files(outputs["gguf"])}  # a GGUF runs as it is: no export
    if "lora_gguf" in outputs:
        runtimes["base GGUF + llama.cpp adapter"] = dataclasses.replace(
            runtime_files(outputs["base_gguf"]), lora=Path(outputs["lora_gguf"]))
    return answer_questions(task, count, lambda: {
        label: TextGenerator(None, files.tokenizer, engine=LlamaCppEngine.for_files(files, 1024))
        for label, files in runtimes.items()})


def answers_in_torch(model: str, task: str | None, count: int) -> list[dict]:
    """The same questions answered by the final model on slmkit's torch engine (no llama.cpp here)."""
    def generators() -> dict[str, TextGenerator]:
        loaded = load(model, dtype=torch.float32, merge=True)
        return {"final model": TextGenerator(loaded.model, loaded.tokenizer)}
    return answer_questions(task, count, generators)


def answer_questions(task: str | None, count: int, generators: Callable[[], dict[str, TextGenerator]]) -> list[dict]:
    """Each generator's greedy reply to the last user turn of the task's first `count` test examples,
    beside the expected answer (none for a task without chat examples: the models are not loaded)."""
    if not count or not task or task not in TASKS:
        return []
    answers, models = [], generators()
    for example in task_data(task).test[:count]:
        answer = {"question": example.messages[-2]["content"], "expected": example.messages[-1]["content"]}
        for label, generator in models.items():
            answer[label] = generator.chat(example.messages[:-1], SamplingParams(max_new_tokens=48)).text.strip()
        answers.append(answer)
    return answers

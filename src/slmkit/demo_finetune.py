"""The demo's fine-tuning step: LoRA-tune SmolLM2 on Symptom2Disease in a few minutes, then show
what it changed on held-out rows it never saw: accuracy (by likelihood over the 24 diseases and by
free answer) and the hallucination rate (answers naming no known disease), and answer two held-out
descriptions. Everything lands in runs/demo/s2d-lora.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.table import Table

from slmkit.card import console
from slmkit.data.shared import shared_data_dir
from slmkit.data.tasks import FinetuneData
from slmkit.evals.lm import LocalLM
from slmkit.evals.runner import run_task
from slmkit.evals.tasks import make_task
from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL
from slmkit.train.finetune import FinetuneConfig, run
from slmkit.train.loop import TrainConfig

WORK = Path("runs/demo/s2d-lora")
HELD_OUT = 48  # test rows scored before and after (a seeded sample of the 191)


def demo_config() -> FinetuneConfig:
    return FinetuneConfig(base=DEFAULT_MODEL, method="lora", out=str(WORK), epochs=1.5,
                          data=FinetuneData(task="symptom2disease", packing=True),
                          train=TrainConfig(steps=0, micro_batch_size=4, seq_len=256, lr=2e-3, min_lr=2e-4,
                                            warmup_steps=5, weight_decay=0.0, eval_every=0, checkpoint_every=0))


def finetune_step() -> None:
    root = shared_data_dir()
    if root is None or not (root / "tasks" / "symptom2disease").is_dir():
        console.print("[yellow]skipped: no shared task data (../shared/data/tasks or $SLMKIT_DATA_DIR)[/]")
        return
    task = make_task("symptom2disease", root / "eval")
    before = _score(DEFAULT_MODEL, task)
    shutil.rmtree(WORK, ignore_errors=True)
    started = time.perf_counter()
    run(demo_config())
    console.print(f"fine-tuned in {time.perf_counter() - started:.0f}s")
    after = _score(str(WORK), task)
    table = Table(title=f"Symptom2Disease, {HELD_OUT} held-out rows (never trained on)")
    for column in ("model", "accuracy (likelihood)", "accuracy (free answer)", "hallucination rate"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, m in (("SmolLM2-135M-Instruct", before), ("+ LoRA (runs/demo/s2d-lora)", after)):
        table.add_row(name, f"{m['acc']:.1%}", f"{m['exact_match']:.1%}", f"{m['hallucination_rate']:.1%}")
    console.print(table)
    _answer_two(task)


def _score(model: str, task) -> dict[str, float]:
    loaded = load(model, dtype=torch.float32, merge=True)
    return run_task(LocalLM(loaded.model, loaded.tokenizer), task, shots=0, limit=HELD_OUT, progress=False).metrics


def _answer_two(task) -> None:
    loaded = load(str(WORK), dtype=torch.float32, merge=True)
    generator = TextGenerator(loaded.model, loaded.tokenizer)
    for doc in task.eval_docs().rows[HELD_OUT:HELD_OUT + 2]:  # rows the tables above did not use either
        messages = doc["example"].messages
        console.print(f"[bold cyan]patient>[/] {messages[-2]['content']}")
        answer = generator.chat(messages[:-1], SamplingParams(max_new_tokens=16)).text
        console.print(f"[bold]model>[/] {answer}   [dim](diagnosis in the data: {doc['example'].label})[/]")

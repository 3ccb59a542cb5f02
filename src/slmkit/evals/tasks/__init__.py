"""The task registry: `make_task(name, data_dir)`; `TASKS` lists the names."""

from __future__ import annotations

from pathlib import Path

from slmkit.errors import SlmError
from slmkit.evals.tasks.base import Task
from slmkit.evals.tasks.chat import SPLITS, chat_tasks
from slmkit.evals.tasks.choice import Arc, BoolQ, HellaSwag, Lambada, Mmlu, Piqa, WinoGrande
from slmkit.evals.tasks.gsm8k import Gsm8k
from slmkit.evals.tasks.humaneval import HumanEval

_FACTORIES = {
    "hellaswag": HellaSwag,
    "arc_easy": lambda d: Arc(d, "arc_easy", "ARC-Easy"),
    "arc_challenge": lambda d: Arc(d, "arc_challenge", "ARC-Challenge"),
    "piqa": Piqa,
    "winogrande": WinoGrande,
    "boolq": BoolQ,
    "lambada": Lambada,
    "mmlu": Mmlu,
    "gsm8k": Gsm8k,
    "humaneval": HumanEval,
}
CHAT_TASKS = chat_tasks()  # the fine-tuning tasks' test splits (symptom2disease, sentiment, sst2, scitldr, self_instruct)
_FACTORIES.update(CHAT_TASKS)
TASKS = tuple(_FACTORIES)
# The default suite: 0-shot multiple choice and 5-shot GSM8K, each on its first N documents (MMLU:
# the first N of every subject) so that SmolLM2-135M runs it in under an hour on 2 CPU cores
# (measured: ~0.3 s per ARC/MMLU question, ~0.5 s per HellaSwag/BoolQ one, ~15 s per GSM8K answer).
# `slm eval --full` scores every document instead (about 4 hours of multiple choice and 4 of GSM8K).
DEFAULT_SUITE = {"hellaswag": 800, "arc_easy": 1000, "arc_challenge": None, "piqa": 1000, "winogrande": None,
                 "boolq": 600, "mmlu": 20, "gsm8k": 40}


def make_task(name: str, data_dir: Path) -> Task:
    if name.startswith("mmlu_"):  # one subject, e.g. mmlu_anatomy
        return Mmlu(data_dir, [name.removeprefix("mmlu_")])
    base, _, split = name.partition(":")
    if split:  # a fine-tuning task's validation split, e.g. symptom2disease:val
        if base not in CHAT_TASKS or split not in SPLITS:
            raise SlmError(f"unknown task '{name}'; NAME:SPLIT works for {', '.join(CHAT_TASKS)} with "
                           f"{' or '.join(SPLITS)}")
        return CHAT_TASKS[base](data_dir, split)
    if name not in _FACTORIES:
        raise SlmError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)} (and mmlu_SUBJECT, NAME:val)")
    return _FACTORIES[name](data_dir)

"""The task registry: `make_task(name, data_dir)`; `TASKS` lists the names."""

from __future__ import annotations

from pathlib import Path

from slmkit.errors import SlmError
from slmkit.evals.tasks.base import Task
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
TASKS = tuple(_FACTORIES)
# the suite of the acceptance run: 0-shot multiple choice, 5-shot GSM8K
DEFAULT_SUITE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "mmlu", "gsm8k")


def make_task(name: str, data_dir: Path) -> Task:
    if name.startswith("mmlu_"):  # one subject, e.g. mmlu_anatomy
        return Mmlu(data_dir, [name.removeprefix("mmlu_")])
    if name not in _FACTORIES:
        raise SlmError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)} (and mmlu_SUBJECT)")
    return _FACTORIES[name](data_dir)

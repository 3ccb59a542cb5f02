"""The two kinds of task: multiple choice (scored by log-likelihood) and generation (scored on text).

A task reads its documents from the shared evaluation data (`data_dir`, by default
../shared/data/eval), turns each into requests with lm-evaluation-harness's prompt format, and
turns the model's answers into per-document metric values; `evals.runner` does the rest (few-shot
contexts, batching, aggregation, stderr). Malformed rows are skipped and counted (`Docs.skipped`,
with the first bad line number), never silently dropped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.evals.lm import LoglikelihoodRequest as Request


@dataclass
class Docs:
    rows: list[dict]
    skipped: int = 0
    first_bad: str | None = None  # "file:line" of the first skipped row


class Task:
    name = ""
    kind = "multiple_choice"  # or "generate"
    metrics: tuple[str, ...] = ("acc",)
    default_shots = 0
    fewshot_delimiter = "\n\n"
    target_delimiter = " "

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    # -- data ---------------------------------------------------------------------------------
    def eval_docs(self) -> Docs:
        raise NotImplementedError

    def fewshot_docs(self) -> Docs:
        """Where k-shot examples come from (a train/dev split; never the evaluated documents)."""
        raise SlmError(f"{self.name} has no split to draw few-shot examples from; use --shots 0")

    # -- prompts ------------------------------------------------------------------------------
    def description(self, doc: dict) -> str:
        """Text before the few-shot examples (MMLU names its subject here)."""
        return ""

    def text(self, doc: dict) -> str:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        """The gold answer as it is written after `text` in a few-shot example."""
        raise NotImplementedError

    def fewshot_examples(self, doc: dict, pool: list[dict], shots: int, rng) -> list[dict]:
        """k examples drawn at random from the pool, never the evaluated document itself."""
        candidates = [d for d in pool if d is not doc and d != doc]
        return rng.sample(candidates, min(shots, len(candidates)))

    def fewshot_example(self, doc: dict) -> str:
        return self.text(doc) + self.target_delimiter + self.target(doc)

    def context(self, doc: dict, examples: list[dict]) -> str:
        """What precedes the document's own text: description + examples + delimiters."""
        head = self.description(doc)
        if not examples:
            return head
        return head + self.fewshot_delimiter.join(self.fewshot_example(d) for d in examples) + self.fewshot_delimiter


class MultipleChoiceTask(Task):
    metrics = ("acc", "acc_norm")

    def choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        return self.choices(doc)[self.gold(doc)]

    def requests(self, doc: dict, fewshot: str) -> list[Request]:
        """One (context, continuation) per choice; `fewshot` is the text that precedes this doc."""
        context = fewshot + self.text(doc)
        return [Request(context, self.target_delimiter + c) for c in self.choices(doc)]

    def score(self, doc: dict, logprobs: list[float], greedy: list[bool]) -> dict[str, float]:
        """acc: the most likely choice is gold; acc_norm: the same per byte of the choice's text
        (lm-evaluation-harness divides by the continuation's length in characters; bytes agree on
        English and do not favour non-ASCII answers)."""
        gold = self.gold(doc)
        values = {"acc": float(self.chosen(doc, logprobs, per_byte=False) == gold)}
        if "acc_norm" in self.metrics:
            values["acc_norm"] = float(self.chosen(doc, logprobs, per_byte=True) == gold)
        return values

    def chosen(self, doc: dict, logprobs: list[float], per_byte: bool) -> int:
        """The model's answer: the most likely choice, per byte of its text for acc_norm."""
        if per_byte:
            logprobs = [lp / max(len(c.encode()), 1) for lp, c in zip(logprobs, self.choices(doc))]
        return _argmax(logprobs)


class GenerateTask(Task):
    kind = "generate"
    metrics = ("exact_match",)
    until: tuple[str, ...] = ("\n\n",)
    max_new_tokens = 256

    def prompt(self, doc: dict, fewshot: str) -> str:
        return fewshot + self.text(doc)

    def score(self, doc: dict, output: str) -> dict[str, float]:
        raise NotImplementedError


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (ties go to the earlier choice, deterministically)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def read_jsonl(path: Path, check=None) -> Docs:
    """Rows of a JSON-lines file (gzipped if it ends in .gz); a row that does not parse or fails `check(row)` is skipped and counted
    (with its line number in `first_bad`), so one bad line never loses a whole task."""
    if not path.is_file():
        raise SlmError(f"evaluation data {path} is missing; point --data-dir at a copy of the shared "
                       "eval data (../shared/data/eval)")
    docs, index = Docs([]), -1
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            index += 1
            try:
                row = json.loads(line)
                row["_index"] = index  # its place among the file's rows (labels files count the same way)
                if check is not None and not check(row):
                    raise ValueError
            except (ValueError, KeyError, TypeError, IndexError):
                docs.skipped += 1
                docs.first_bad = docs.first_bad or f"{path.name}:{number}"
                continue
            docs.rows.append(row)
    return docs


@dataclass
class TaskResult:
    task: str
    shots: int
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    seconds: float
    skipped: int = 0
    truncated: int = 0
    extra: dict = field(default_factory=dict)

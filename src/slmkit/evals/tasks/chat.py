"""The fine-tuning tasks (`slmkit.data.tasks`) as harness tasks, scored on their test split.

Prompts are the same chat conversations the model is fine-tuned on, rendered with the model's
own chat template (so these tasks need a local model with a template, not --endpoint); k-shot
examples are earlier user/assistant turns drawn from the train split.

Classification (symptom2disease, sentiment, sst2) is scored two ways at once:
    acc            the label whose whole answer (label + end of turn, exactly the trained tokens) is
                   the most likely, by log-likelihood over the closed label set
    exact_match    the greedy free answer equals the gold label (case and punctuation aside)
    hallucination_rate  the free answer names none of the labels (`slmkit.evals.hallucination`)
Generation (scitldr, self_instruct): ROUGE-1/2/L F1 of the greedy answer (rouge-score, Porter
stemming), the best over the references, as SciTLDR reports it.

`NAME` scores the test split; `NAME:val` the validation split, for choosing settings without
looking at the test rows.
"""

from __future__ import annotations

import random
from pathlib import Path

from slmkit.data.sft import chat_spans
from slmkit.data.tasks import TASK_SEED, TaskData, default_tasks_dir, task_data
from slmkit.errors import SlmError
from slmkit.evals.hallucination import check_labels, normalise
from slmkit.evals.tasks.base import Docs, GenerateTask, MultipleChoiceTask, Request, Task

ROUGE = ("rouge1", "rouge2", "rougeL")


class ChatTaskMixin(Task):
    """Shared by both kinds: the task's data, the bound chat template, the rendered prompt."""

    needs_tokenizer = True
    fewshot_delimiter = ""

    def __init__(self, data_dir: Path, name: str, split: str = "test"):
        super().__init__(data_dir)
        self.task, self.split, self._data, self.tokenizer = name, split, None, None
        self.name = name if split == "test" else f"{name}:{split}"

    @property
    def data(self) -> TaskData:
        if self._data is None:
            tasks = self.data_dir.parent / "tasks"
            self._data = task_data(self.task, tasks if tasks.is_dir() else default_tasks_dir())
        return self._data

    def bind(self, tokenizer) -> None:
        if tokenizer is None or not tokenizer.chat_template:
            raise SlmError(f"task {self.name} renders its prompts with the model's chat template; it needs a local "
                           "model that has one (not --endpoint)")
        self.tokenizer = tokenizer

    def eval_docs(self) -> Docs:
        """The test split (or `name:val`, to choose settings on) in a seeded order: the files group
        rows by label, so --limit N gets a fair sample."""
        rows = [{"example": e, "_index": i} for i, e in enumerate(self.data.split(self.split))]
        random.Random(f"{TASK_SEED}:{self.task}:{self.split}").shuffle(rows)
        return Docs(rows)

    def fewshot_docs(self) -> Docs:
        return Docs([{"example": e, "_index": i} for i, e in enumerate(self.data.train)])

    def fewshot_examples(self, doc: dict, pool: list[dict], shots: int, rng) -> list[dict]:
        """k train examples at random (the pool is the train split, which holds no test row)."""
        return rng.sample(pool, min(shots, len(pool)))

    def messages(self, doc: dict, examples: list[dict]) -> list[dict]:
        """System, then each example's user/assistant turns, then this document's user turn."""
        own = doc["example"].messages
        system = [m for m in own if m["role"] == "system"]
        turns = [m for ex in examples for m in ex["example"].messages if m["role"] != "system"]
        return system + turns + [m for m in own[:-1] if m["role"] != "system"]

    def context(self, doc: dict, examples: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(self.messages(doc, examples), add_generation_prompt=True)

    def answer(self, doc: dict) -> str:
        return doc["example"].messages[-1]["content"]

    def target(self, doc: dict) -> str:
        return self.answer(doc)


class ChatClassification(ChatTaskMixin, MultipleChoiceTask):
    kind = "label"
    metrics = ("acc", "exact_match", "hallucination_rate")
    until: tuple[str, ...] = ()
    max_new_tokens = 24

    def choices(self, doc: dict) -> list[str]:
        return self.data.labels

    def gold(self, doc: dict) -> int:
        return self.data.labels.index(doc["example"].label)

    def requests(self, doc: dict, context: str) -> list[Request]:
        """Each label as the whole assistant answer, end-of-turn marker included: exactly the span
        fine-tuning trains (`chat_spans`), which a turn-by-turn template renders the same after any
        earlier turns, so the few-shot turns in `context` do not change it."""
        return [Request(context, self.answer_text(doc, label)) for label in self.choices(doc)]

    def answer_text(self, doc: dict, label: str) -> str:
        messages = doc["example"].messages[:-1] + [{"role": "assistant", "content": label}]
        text, spans = chat_spans(self.tokenizer, messages)
        start, end = spans[-1]
        return text[start:end]

    def prompt(self, doc: dict, context: str) -> str:
        return context

    def score_answer(self, doc: dict, output: str) -> dict[str, float]:
        gold = normalise(doc["example"].label)
        return {"exact_match": float(normalise(output) == gold),
                "hallucination_rate": float(check_labels([output], self.data.labels).out_of_set > 0)}


class ChatGeneration(ChatTaskMixin, GenerateTask):
    metrics = ROUGE
    until: tuple[str, ...] = ()

    def __init__(self, data_dir: Path, name: str, max_new_tokens: int, split: str = "test"):
        super().__init__(data_dir, name, split)
        self.max_new_tokens = max_new_tokens
        self._scorer = None

    def prompt(self, doc: dict, context: str) -> str:
        return context

    def score(self, doc: dict, output: str) -> dict[str, float]:
        if self._scorer is None:
            from rouge_score.rouge_scorer import RougeScorer

            self._scorer = RougeScorer(list(ROUGE), use_stemmer=True)
        scores = [self._scorer.score(ref, output.strip()) for ref in doc["example"].references]
        return {m: max(s[m].fmeasure for s in scores) for m in ROUGE}


def chat_tasks() -> dict:
    """Factories by task name, for the registry."""
    return {
        "symptom2disease": lambda d, split="test": ChatClassification(d, "symptom2disease", split),
        "sentiment": lambda d, split="test": ChatClassification(d, "sentiment", split),
        "sst2": lambda d, split="test": ChatClassification(d, "sst2", split),
        "scitldr": lambda d, split="test": ChatGeneration(d, "scitldr", 96, split),
        "self_instruct": lambda d, split="test": ChatGeneration(d, "self_instruct", 256, split),
    }


SPLITS = ("test", "val")

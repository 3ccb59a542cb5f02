"""The user's own rows as a task: `slm eval MODEL --data FILE.jsonl`.

One JSON object per line, in the formats `slm finetune` trains on, so a model is scored the way
it was trained:
    {"messages": [..., {"role": "user", ...}] (+ {"role": "assistant", ...}), "label": "...",
     "references": ["...", ...]}
    {"prompt": "...", "completion": "...", "label": "...", "references": [...]}
Chats are rendered with the model's chat template; prompt rows are the raw prompt followed by the
answer and the end-of-sequence token, as `slm finetune` trains a prompt/completion row.

Classification (every row has a `label`, or the answers take few distinct values: at most
CLOSED_SET_MAX, and at most a third of the rows): the built-in classification scoring
(`ChatClassification`: accuracy by log-likelihood over the label set, the free answer's exact
match and hallucination rate) plus macro-F1 (bootstrap standard error), per-class precision and
recall, and the confusion matrix. Generation (references: `references`, else the completion or
the assistant's answer): ROUGE-1/2/L, exact match and chrF (sacrebleu), best over the references.
Either way every answer is kept (`extra["answers"]`) for the JSONL written beside the results.

Rows are checked before any work: one format per file, a `label` on every row or none, no empty
label or reference, and (given the training file) no label the training rows never show.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import CHRF

from slmkit.data.readers import json_records
from slmkit.data.sft import Example, check_messages
from slmkit.data.tasks import TaskData
from slmkit.errors import SlmError
from slmkit.evals.hallucination import normalise
from slmkit.evals.tasks.base import Docs
from slmkit.evals.tasks.chat import ROUGE, ChatClassification, ChatGeneration

KINDS = ("auto", "classification", "generation")
CLOSED_SET_MAX = 50  # distinct answers beyond which a file without labels is read as generation
BOOTSTRAP_ROUNDS = 1000  # resamples for macro-F1's standard error (seeded: the same file gives the same value)
GENERATION_TOKENS = 256


@dataclass
class UserRows:
    path: Path
    form: str  # "chat" or "prompt"
    examples: list[Example]  # each ends with its answer: an assistant turn, or `completion`
    labelled: bool  # every row has a `label`

    @property
    def answers(self) -> list[str]:
        return [e.label if e.label is not None else answer_of(e) for e in self.examples]


def answer_of(example: Example) -> str:
    return example.messages[-1]["content"] if example.messages is not None else example.completion


def read_user_rows(path: str | Path) -> UserRows:
    """Every row of an evaluation JSONL, checked; an error names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"evaluation data '{path}' not found")
    if path.suffix != ".jsonl":
        raise SlmError(f"'{path}' is not .jsonl; write one JSON object per line (messages or prompt, "
                       "with a label or references)")
    form, examples, labelled = None, [], None
    for where, row in json_records(path):
        kind = "chat" if "messages" in row else "prompt" if "prompt" in row else None
        if kind is None:
            raise SlmError(f"{where}: neither 'messages' nor 'prompt'; it has: {', '.join(map(str, row)) or 'nothing'}")
        if form is not None and kind != form:
            raise SlmError(f"{where}: a {kind} row in a file of {form} rows; use one format per file")
        has_label = row.get("label") is not None
        if labelled is not None and has_label != labelled:
            raise SlmError(f"{where}: {'a' if has_label else 'no'} 'label' where the rows before "
                           f"{'have none' if has_label else 'have one'}; label every row or none")
        form, labelled = kind, has_label
        examples.append(_example(row, kind, where))
    if not examples:
        raise SlmError(f"'{path}' holds no rows")
    return UserRows(path, form, examples, bool(labelled))


def _example(row: dict, kind: str, where: str) -> Example:
    label = _label(row, where)
    refs = _references(row, where)
    if kind == "chat":
        messages = check_messages(row["messages"], where)
        answer = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
        if not messages or messages[-1]["role"] != "user":
            raise SlmError(f"{where}: 'messages' must end with a user turn (and may add the assistant's answer)")
    else:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise SlmError(f"{where}: 'prompt' must be non-empty text")
        answer = row.get("completion")
        if answer is not None and not isinstance(answer, str):
            raise SlmError(f"{where}: 'completion' must be text")
    gold = label if label is not None else answer if answer and answer.strip() else (refs[0] if refs else None)
    if gold is None:
        raise SlmError(f"{where}: nothing to score against; give a 'label', 'references', or the answer "
                       f"({'an assistant turn' if kind == 'chat' else 'completion'})")
    refs = refs or [gold]
    if kind == "chat":
        return Example(messages=messages + [{"role": "assistant", "content": gold}], label=label, where=where,
                       references=refs)
    return Example(prompt=row["prompt"], completion=gold, label=label, where=where, references=refs)


def _label(row: dict, where: str) -> str | None:
    label = row.get("label")
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise SlmError(f"{where}: 'label' must be non-empty text, got {label!r:.60}")
    return str(label).strip()


def _references(row: dict, where: str) -> list[str]:
    refs = row.get("references")
    if refs is None:
        return []
    if not isinstance(refs, list) or not refs:
        raise SlmError(f"{where}: 'references' must be a non-empty list of texts")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            raise SlmError(f"{where}: reference {i} is empty; every reference must be non-empty text")
    return refs


def closed_set(answers: list[str]) -> bool:
    """Answers that read as classes: few distinct values, each seen about three times or more."""
    distinct = len(set(answers))
    return distinct <= CLOSED_SET_MAX and distinct * 3 <= len(answers)


def user_task(path: str | Path, kind: str = "auto", train: str | Path | None = None,
              max_new_tokens: int = GENERATION_TOKENS):
    """The task of a user's file (`kind`: auto, classification or generation); `train`: the file it
    was fine-tuned on, whose labels must cover the evaluated ones (and whose rows give --shots);
    `max_new_tokens`: a generated answer's budget."""
    if kind not in KINDS:
        raise SlmError(f"unknown data kind '{kind}' (choose from {', '.join(KINDS)})")
    if max_new_tokens < 1:
        raise SlmError(f"the answer budget must be at least 1 token, not {max_new_tokens}")
    rows = read_user_rows(path)
    pool = read_user_rows(train) if train else None
    if pool is not None and pool.form != rows.form:
        raise SlmError(f"'{path}' holds {rows.form} rows but the training file '{train}' holds {pool.form} rows")
    if kind == "auto":
        kind = "classification" if rows.labelled or closed_set(rows.answers) else "generation"
    name = f"file:{Path(path).name}"
    if kind == "classification":
        for example, answer in zip(rows.examples, rows.answers):
            example.label = answer  # a closed-set answer is its row's label
        labels = sorted(set(rows.answers))
        if pool is not None:
            known = set(pool.answers)
            unseen = [(e.where, a) for e, a in zip(rows.examples, rows.answers) if a not in known]
            if unseen:
                raise SlmError(f"{unseen[0][0]}: label '{unseen[0][1]}' never appears in the training file "
                               f"'{train}' ({len({a for _, a in unseen})} such labels); the model cannot have "
                               "learnt it -- fix the label or add training rows")
            labels = sorted(known | set(labels))
        data = TaskData(name, "classification", pool.examples if pool else [], [], rows.examples, labels)
        return FileClassification(rows, data)
    data = TaskData(name, "generation", pool.examples if pool else [], [], rows.examples)
    return FileGeneration(rows, data, max_new_tokens)


class FileRowsMixin:
    """A user's file in place of a built-in task's split: file order (--limit N scores the first N
    rows), few-shot examples from the training file, prompt rows without a chat template."""

    def _init_rows(self, rows: UserRows, data: TaskData) -> None:
        self.rows, self._data, self.name = rows, data, data.name

    def bind(self, tokenizer) -> None:
        if self.rows.form == "chat":
            super().bind(tokenizer)
        elif tokenizer is None:
            raise SlmError(f"{self.name} needs the model's tokenizer (a local model, not --endpoint)")
        self.tokenizer = tokenizer

    def eval_docs(self) -> Docs:
        return Docs([{"example": e, "_index": i} for i, e in enumerate(self.data.test)])

    def fewshot_docs(self) -> Docs:
        if not self.data.train:
            raise SlmError(f"{self.name}: few-shot examples come from the training file; pass it (--train-data) "
                           "or use --shots 0")
        return super().fewshot_docs()

    def context(self, doc: dict, examples: list[dict]) -> str:
        if self.rows.form == "chat":
            return super().context(doc, examples)
        shots = "".join(e["example"].prompt + e["example"].completion + "\n\n" for e in examples)
        return shots + doc["example"].prompt

    def answer_text(self, doc: dict, label: str) -> str:
        """A prompt row's answer as trained: the text, then the end-of-sequence token."""
        if self.rows.form == "chat":
            return super().answer_text(doc, label)
        return label + (self.tokenizer.token(self.tokenizer.eos_token_id) or "")

    def answers(self, rows: list[dict], per_doc: list[dict]) -> list[dict]:
        return [{"where": d["example"].where, "expected": d["example"].references if self.data.kind == "generation"
                 else d["example"].label,
                 **{k.lstrip("_"): v for k, v in values.items()}} for d, values in zip(rows, per_doc)]


class FileClassification(FileRowsMixin, ChatClassification):
    metrics = ("acc", "exact_match", "hallucination_rate", "macro_f1")

    def __init__(self, rows: UserRows, data: TaskData):
        super().__init__(rows.path.parent, data.name)
        self._init_rows(rows, data)

    def score(self, doc: dict, logprobs: list[float], greedy: list[bool]) -> dict:
        return {**super().score(doc, logprobs, greedy), "_predicted": self.data.labels[self.chosen(doc, logprobs, False)]}

    def score_answer(self, doc: dict, output: str) -> dict:
        return {**super().score_answer(doc, output), "_answer": output}

    def summarize(self, rows: list[dict], per_doc: list[dict]) -> tuple[dict, dict, dict]:
        """(metrics, their standard errors, extra): macro-F1, per-class scores, the confusion matrix
        of the likelihood predictions (rows: the expected label; columns: the predicted one)."""
        gold = [self.data.labels[self.gold(d)] for d in rows]
        predicted = [v["_predicted"] for v in per_doc]
        report = class_report(gold, predicted, self.data.labels)
        f1 = macro_f1(gold, predicted, self.data.labels)
        extra = {"per_class": report, "labels": self.data.labels,
                 "confusion": confusion(gold, predicted, self.data.labels), "answers": self.answers(rows, per_doc)}
        return {"macro_f1": f1}, {"macro_f1": bootstrap_se(gold, predicted, self.data.labels)}, extra


class FileGeneration(FileRowsMixin, ChatGeneration):
    metrics = (*ROUGE, "exact_match", "chrf")

    def __init__(self, rows: UserRows, data: TaskData, max_new_tokens: int = GENERATION_TOKENS):
        super().__init__(rows.path.parent, data.name, max_new_tokens)
        self._init_rows(rows, data)
        self._rouge, self._chrf = RougeScorer(list(ROUGE), use_stemmer=True), CHRF()

    def score(self, doc: dict, output: str) -> dict:
        refs = doc["example"].references
        rouge = [self._rouge.score(ref, output.strip()) for ref in refs]
        return {**{m: max(s[m].fmeasure for s in rouge) for m in ROUGE},
                "exact_match": float(normalise(output) in {normalise(r) for r in refs}),
                "chrf": self._chrf.sentence_score(output.strip(), refs).score / 100, "_answer": output}

    def summarize(self, rows: list[dict], per_doc: list[dict]) -> tuple[dict, dict, dict]:
        return {}, {}, {"answers": self.answers(rows, per_doc)}


# ---------------------------------------------------------------------------------------------
# Classification scores
# ---------------------------------------------------------------------------------------------


def class_report(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Per label: precision and recall (each with its binomial standard error), F1 and support."""
    out = {}
    for label in labels:
        hits = sum(g == p == label for g, p in zip(gold, predicted))
        said, support = predicted.count(label), gold.count(label)
        precision, recall = _ratio(hits, said), _ratio(hits, support)
        out[label] = {"precision": precision, "precision_se": _binomial_se(precision, said),
                      "recall": recall, "recall_se": _binomial_se(recall, support),
                      "f1": _f1(precision, recall), "support": support}
    return out


def macro_f1(gold: list[str], predicted: list[str], labels: list[str]) -> float:
    """The unweighted mean of the F1 of the labels that occur (as expected or predicted)."""
    counts = Counter(zip(gold, predicted))
    said, support = Counter(predicted), Counter(gold)
    present = [label for label in labels if said[label] or support[label]]
    return sum(_f1(_ratio(counts[(c, c)], said[c]), _ratio(counts[(c, c)], support[c])) for c in present) / max(len(present), 1)


def bootstrap_se(gold: list[str], predicted: list[str], labels: list[str]) -> float:
    """Macro-F1's standard error: its spread over rows resampled with replacement."""
    if len(gold) < 2:
        return float("nan")
    rng = random.Random(0)
    values = []
    for _ in range(BOOTSTRAP_ROUNDS):
        pick = [rng.randrange(len(gold)) for _ in gold]
        values.append(macro_f1([gold[i] for i in pick], [predicted[i] for i in pick], labels))
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def confusion(gold: list[str], predicted: list[str], labels: list[str]) -> list[list[int]]:
    """counts[i][j]: rows whose label is labels[i] predicted as labels[j]."""
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        counts[index[g]][index[p]] += 1
    return counts


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 1 else float("nan")

"""Multiple-choice tasks, each in lm-evaluation-harness's prompt format (quoted in its docstring).

`Question: ...\nAnswer:` plus " " + choice is the harness's format for ARC and PIQA; the gold
choice is the one with the highest summed log-likelihood (acc) or the highest per byte (acc_norm).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.evals.tasks.base import Docs, MultipleChoiceTask, Request, read_jsonl


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _with_labels(docs: Docs, labels_file: Path, key: str = "label") -> Docs:
    """Attach the i-th label of `labels_file` to the i-th row (rows remember their index, so a
    skipped malformed row does not shift the labels of the rows after it)."""
    labels = _labels(labels_file)
    if len(labels) != len(docs.rows) + docs.skipped:
        raise SlmError(f"{labels_file} has {len(labels)} labels for {len(docs.rows) + docs.skipped} rows")
    for row in docs.rows:
        row[key] = int(labels[row["_index"]])
    return docs


class HellaSwag(MultipleChoiceTask):
    """HellaSwag (validation). Harness: query = preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()), choices = preprocess(ending), metrics acc and acc_norm, where preprocess
    strips, turns " [title]" into ". ", drops other [bracketed] text and double spaces.

    Our file keeps `ctx` = ctx_a + " " + ctx_b joined; ctx_b is the lower-case start of the final
    sentence, so the part after the last ". " is capitalized when it starts in lower case
    (the harness's `ctx_b.capitalize()`)."""

    name = "hellaswag"

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "hellaswag" / "hellaswag_val.jsonl",
                          lambda r: len(r["endings"]) == 4 and 0 <= int(r["label"]) < 4 and r["ctx"] is not None)

    def text(self, doc: dict) -> str:
        ctx = doc["ctx"]
        head, sep, tail = ctx.rpartition(". ")
        if sep and tail[:1].islower():
            ctx = head + sep + tail[:1].upper() + tail[1:]
        return _hellaswag_clean(doc["activity_label"] + ": " + ctx)

    def choices(self, doc: dict) -> list[str]:
        return [_hellaswag_clean(e) for e in doc["endings"]]

    def gold(self, doc: dict) -> int:
        return int(doc["label"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class Arc(MultipleChoiceTask):
    """ARC (test split; few-shot from train). Harness: "Question: {question}\\nAnswer:" and
    " {choice text}"; metrics acc and acc_norm."""

    def __init__(self, data_dir: Path, name: str, stem: str):
        super().__init__(data_dir)
        self.name, self.stem = name, stem

    def _file(self, split: str) -> Path:
        return self.data_dir / self.name / f"{self.stem}-{split}.jsonl"

    @staticmethod
    def _valid(row: dict) -> bool:
        labels = [c["label"] for c in row["question"]["choices"]]
        return row["answerKey"] in labels and bool(row["question"]["stem"])

    def eval_docs(self) -> Docs:
        return read_jsonl(self._file("Test"), self._valid)

    def fewshot_docs(self) -> Docs:
        return read_jsonl(self._file("Train"), self._valid)

    def text(self, doc: dict) -> str:
        return f"Question: {doc['question']['stem']}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return [c["text"] for c in doc["question"]["choices"]]

    def gold(self, doc: dict) -> int:
        return [c["label"] for c in doc["question"]["choices"]].index(doc["answerKey"])


class Piqa(MultipleChoiceTask):
    """PIQA (validation = dev.jsonl + dev-labels.lst). Harness: "Question: {goal}\\nAnswer:" and
    " {sol1}" / " {sol2}"; metrics acc and acc_norm. No training split is shared, so few-shot
    examples come from the other validation rows (never the evaluated one)."""

    name = "piqa"

    def eval_docs(self) -> Docs:
        folder = self.data_dir / "piqa"
        return _with_labels(read_jsonl(folder / "dev.jsonl", lambda r: r["goal"] is not None and r["sol2"] is not None),
                            folder / "dev-labels.lst")

    fewshot_docs = eval_docs

    def text(self, doc: dict) -> str:
        return f"Question: {doc['goal']}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return [doc["sol1"], doc["sol2"]]

    def gold(self, doc: dict) -> int:
        return doc["label"]


class WinoGrande(MultipleChoiceTask):
    """WinoGrande (dev, v1.1 "xl" validation). Harness "partial evaluation": one context per
    option, the sentence up to the blank with the option filled in, and the same continuation for
    both, " " + the rest of the sentence after the blank; acc compares the continuation's
    log-likelihood under each context."""

    name = "winogrande"
    metrics = ("acc",)

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "winogrande" / "dev.jsonl",
                          lambda r: r["sentence"].count("_") >= 1 and r["answer"] in ("1", "2"))

    fewshot_docs = eval_docs

    def _split(self, doc: dict) -> tuple[str, str]:
        i = doc["sentence"].index("_")
        return doc["sentence"][:i], doc["sentence"][i + 1:].strip()

    def choices(self, doc: dict) -> list[str]:
        return [doc["option1"], doc["option2"]]

    def gold(self, doc: dict) -> int:
        return int(doc["answer"]) - 1

    def text(self, doc: dict) -> str:  # the few-shot form: the sentence with the gold option filled in
        before, _ = self._split(doc)
        return before + self.choices(doc)[self.gold(doc)]

    def target(self, doc: dict) -> str:
        return self._split(doc)[1]

    def requests(self, doc, fewshot):
        before, after = self._split(doc)
        return [Request(fewshot + before + option, " " + after) for option in self.choices(doc)]


class BoolQ(MultipleChoiceTask):
    """BoolQ (SuperGLUE validation; `label` true/false). Harness: "{passage}\\nQuestion: {question}?\\nAnswer:" and " no" /
    " yes"; metric acc. Few-shot examples come from the other validation rows."""

    name = "boolq"
    metrics = ("acc",)

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "boolq" / "val.jsonl",
                          lambda r: str(r["label"]).lower() in ("true", "false") and bool(r["passage"]))

    fewshot_docs = eval_docs

    def text(self, doc: dict) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return ["no", "yes"]

    def gold(self, doc: dict) -> int:
        return int(str(doc["label"]).lower() == "true")


class Lambada(MultipleChoiceTask):
    """LAMBADA (OpenAI's test text). Harness `lambada_openai`: context = the text up to its last
    space, target = " " + the last word; acc = the whole target is the greedy continuation,
    plus the target's perplexity."""

    name = "lambada"
    metrics = ("acc",)

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "lambada" / "lambada_test.jsonl", lambda r: " " in r["text"].strip())

    def text(self, doc: dict) -> str:
        return doc["text"].rsplit(" ", 1)[0]

    def target(self, doc: dict) -> str:
        return doc["text"].rsplit(" ", 1)[1]

    def choices(self, doc: dict) -> list[str]:
        return [self.target(doc)]

    def gold(self, doc: dict) -> int:
        return 0

    def score(self, doc, logprobs, greedy):
        return {"acc": float(greedy[0]), "logprob": logprobs[0]}


MMLU_CHOICES = ("A", "B", "C", "D")


class Mmlu(MultipleChoiceTask):
    """MMLU (57 subjects; test split, few-shot from each subject's dev split). Harness:
    description "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
    then "{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:" and " A".." D"; metric acc,
    reported over all questions and as the unweighted mean over subjects (acc_macro)."""

    name = "mmlu"
    metrics = ("acc",)

    def __init__(self, data_dir: Path, subjects: list[str] | None = None):
        super().__init__(data_dir)
        self.subjects = subjects

    def _read(self, split: str) -> Docs:
        folder = self.data_dir / "mmlu" / split
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise SlmError(f"no MMLU {split} files in {folder}; point --data-dir at the shared eval data")
        docs = Docs([])
        for path in files:
            subject = path.name[: -len(f"_{split}.csv")]
            if self.subjects and subject not in self.subjects:
                continue
            with path.open(encoding="utf-8", newline="") as f:
                for number, row in enumerate(csv.reader(f), 1):
                    if len(row) != 6 or row[5].strip() not in MMLU_CHOICES:
                        docs.skipped += 1
                        docs.first_bad = docs.first_bad or f"{path.name}:{number}"
                        continue
                    docs.rows.append({"subject": subject, "question": row[0], "choices": row[1:5],
                                      "answer": MMLU_CHOICES.index(row[5].strip())})
        return docs

    def eval_docs(self) -> Docs:
        return self._read("test")

    def fewshot_docs(self) -> Docs:
        return self._read("dev")

    def group_of(self, doc: dict) -> str:
        return doc["subject"]

    def fewshot_examples(self, doc: dict, pool: list[dict], shots: int, rng) -> list[dict]:
        """The harness takes the first k dev questions of the same subject, in file order."""
        return [d for d in pool if d["subject"] == doc["subject"]][:shots]

    def description(self, doc: dict) -> str:
        return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"

    def text(self, doc: dict) -> str:
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_CHOICES, doc["choices"]))
        return f"{doc['question'].strip()}{options}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return list(MMLU_CHOICES)

    def gold(self, doc: dict) -> int:
        return doc["answer"]

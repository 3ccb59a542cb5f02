"""Built-in fine-tuning tasks over the shared task data (`../shared/data/tasks`, read in place).

Each task turns its files into chat examples (a system instruction, the user's input, the
assistant's answer) split into train / validation / test by row with a fixed seed, stratified by
label where there are labels. The same split feeds `slm finetune` (train, validation) and
`slm eval` (test), so a test row is never trained or tuned on.

    symptom2disease  Symptom2Disease: a first-person symptom description -> one of 24 diseases
    sentiment        UCI Sentiment Labelled Sentences (Amazon, IMDb, Yelp) -> positive / negative
    sst2             SST-2: train on GLUE's train phrases, validate on some of its dev phrases, test on
                     GLUE's labelled dev sentences
    scitldr          SciTLDR-A: a paper abstract -> a one-sentence TLDR (ROUGE, best of the references)
    self_instruct    Self-Instruct's human-written tasks: an instruction (+ input) -> the answer
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.sft import Example, labels_of, read_examples, split_rows
from slmkit.data.shared import shared_data_dir
from slmkit.errors import SlmError, unknown_choice

TASK_SEED = 1234  # fixed: the test split must be the same for every run and every evaluation
SPLIT = (0.2, 0.1)  # test, validation; the rest trains


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" or "generation"
    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: list[str] | None = None  # the closed answer set of a classification task

    def split(self, part: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[part]


def chat(system: str | None, user: str, answer: str, label: str | None = None, where: str = "",
         references: list[str] | None = None) -> Example:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Example(messages=messages, label=label, where=where, references=references or [answer])


def _three_way(name: str, kind: str, examples: list[Example], strata: list[str] | None,
               labels: list[str] | None = None) -> TaskData:
    test, val, train = split_rows(len(examples), SPLIT, TASK_SEED, strata)
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return TaskData(name, kind, pick(train), pick(val), pick(test), labels)


# ---------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------

S2D_SYSTEM = "You are a medical assistant. Reply with only the name of the disease that best explains the symptoms."
SENTIMENT_SYSTEM = "Classify the sentiment of the review. Reply with one word: positive or negative."
SST2_SYSTEM = "Classify the sentiment of the movie review. Reply with one word: positive or negative."
TLDR_SYSTEM = "Summarize the scientific abstract in one sentence (a TLDR)."
POLARITY = ("negative", "positive")


def symptom2disease(root: Path) -> TaskData:
    path = _file(root, "symptom2disease", "Symptom2Disease.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    examples = [chat(S2D_SYSTEM, r["text"].strip(), r["label"].strip(), r["label"].strip(), f"{path}:{i + 2}")
                for i, r in enumerate(rows) if r.get("text") and r.get("label")]
    labels = sorted({e.label for e in examples})
    return _three_way("symptom2disease", "classification", examples, [e.label for e in examples], labels)


def sentiment(root: Path) -> TaskData:
    examples, strata = [], []
    for source in ("amazon_cells", "imdb", "yelp"):
        path = _file(root, "sentiment_labelled_sentences", f"{source}_labelled.txt")
        # split on "\n" only: the IMDb file has U+0085 inside lines, which str.splitlines would break on
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            text, _, score = line.rpartition("\t")
            if text.strip() and score.strip() in ("0", "1"):
                label = POLARITY[int(score)]
                examples.append(chat(SENTIMENT_SYSTEM, text.strip(), label, label, f"{path}:{number}"))
                strata.append(f"{source}:{label}")
    return _three_way("sentiment", "classification", examples, strata, list(POLARITY))


SST2_MIN_WORDS = 6  # GLUE's train split holds every phrase of the treebank; sentence-like ones teach the task
SST2_VAL_ROWS = 600


def sst2(root: Path) -> TaskData:
    read = lambda name: _sst2_rows(_file(root, "sst2", name))  # noqa: E731
    train = [e for e in read("train.tsv") if len(e.messages[-2]["content"].split()) >= SST2_MIN_WORDS]
    dev = read("dev.tsv")
    val = [dev[i] for i in sorted(random.Random(TASK_SEED).sample(range(len(dev)), min(SST2_VAL_ROWS, len(dev))))]
    return TaskData("sst2", "classification", train, val, read("test.tsv"), list(POLARITY))


def _sst2_rows(path: Path) -> list[Example]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 2):
            if (row.get("sentence") or "").strip() and row.get("label") in ("0", "1"):
                label = POLARITY[int(row["label"])]
                out.append(chat(SST2_SYSTEM, row["sentence"].strip(), label, label, f"{path}:{number}"))
    return out


def scitldr(root: Path) -> TaskData:
    def read(name: str) -> list[Example]:
        path = _file(root, "scitldr", name)
        out = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            abstract = " ".join(s.strip() for s in row["source"])
            refs = [t.strip() for t in row["target"] if t.strip()]
            if abstract and refs:
                out.append(chat(TLDR_SYSTEM, abstract, refs[0], where=f"{path}:{number}", references=refs))
        return out

    return TaskData("scitldr", "generation", read("train.jsonl"), read("dev.jsonl"), read("test.jsonl"))


def self_instruct(root: Path) -> TaskData:
    examples = []
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        path = _file(root, "self_instruct_human", name)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            for instance in row["instances"][:1]:  # one instance per task: the split is by task
                user = row["instruction"].strip() + (f"\n\n{instance['input'].strip()}" if instance["input"].strip() else "")
                if instance["output"].strip():
                    examples.append(chat(None, user, instance["output"].strip(), where=f"{path}:{number}"))
    return _three_way("self_instruct", "generation", examples, None)


TASKS: dict[str, Callable[[Path], TaskData]] = {
    "symptom2disease": symptom2disease, "sentiment": sentiment, "sst2": sst2, "scitldr": scitldr,
    "self_instruct": self_instruct,
}


def task_data(name: str, root: Path | None = None) -> TaskData:
    """The named task's examples and splits; `root` is the shared task folder (../shared/data/tasks)."""
    if name not in TASKS:
        raise unknown_choice("task", name, list(TASKS))
    return TASKS[name](root or default_tasks_dir())


def default_tasks_dir() -> Path:
    shared = shared_data_dir()
    if shared is None or not (shared / "tasks").is_dir():
        raise SlmError("the shared task data (../shared/data/tasks) is not here; set $SLMKIT_DATA_DIR to the shared "
                       "data folder")
    return shared / "tasks"


def _file(root: Path, folder: str, name: str) -> Path:
    path = root / folder / name
    if not path.is_file():
        raise SlmError(f"task data {path} is missing; point $SLMKIT_DATA_DIR at a copy of the shared data")
    return path


# ---------------------------------------------------------------------------------------------
# What `slm finetune` trains on: a built-in task or the user's own files
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneData:
    task: str = ""
    """A built-in task (symptom2disease, sentiment, sst2, scitldr, self_instruct); its test split is never used here."""
    train: str = ""
    """Your training file instead: .jsonl (chat, prompt/completion or text rows) or .txt (text)."""
    val: str = ""
    """Your validation file (default: val_fraction of the training rows, held out with `seed`)."""
    format: str = "auto"
    """auto (from each row's fields), chat, prompt_completion or text."""
    val_fraction: float = 0.1
    """Share of the training rows held out for validation when no val file is given (stratified by `label`)."""
    seed: int = 1234
    """Seed of the held-out split and of max_train_rows' sample."""
    max_train_rows: int = 0
    """Train on at most this many rows (a seeded sample, stratified by label; 0 = all)."""
    max_val_rows: int = 0
    """Validate on at most this many rows (a seeded sample; 0 = all): validation runs every train.eval_every steps."""
    packing: bool = False
    """Lay several examples end to end in each sequence (they never attend to each other)."""
    overlong: str = "truncate"
    """An example longer than train.seq_len + 1 tokens: truncate (cut the middle of its input, counted) or error."""


def finetune_examples(cfg: FinetuneData) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples, checked before any model is loaded."""
    if bool(cfg.task) == bool(cfg.train):
        raise SlmError("set exactly one of data.task (a built-in task) and data.train (your file)")
    if cfg.task:
        data = task_data(cfg.task)
        train, val = data.train, data.val
    else:
        train = read_examples(cfg.train, cfg.format)
        if cfg.val:
            val = read_examples(cfg.val, cfg.format)
        elif cfg.val_fraction > 0:
            if not 0 < cfg.val_fraction < 1:
                raise SlmError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
            held, kept = split_rows(len(train), (cfg.val_fraction,), cfg.seed, labels_of(train))
            train, val = [train[i] for i in kept], [train[i] for i in held]
        else:
            val = []
    return _sample(train, cfg.max_train_rows, cfg.seed), _sample(val, cfg.max_val_rows, cfg.seed)


def _sample(rows: list[Example], limit: int, seed: int) -> list[Example]:
    """At most `limit` rows, a seeded sample stratified by label (0 = all)."""
    if not limit or len(rows) <= limit:
        return rows
    kept, _ = split_rows(len(rows), (limit / len(rows),), seed, labels_of(rows))
    return [rows[i] for i in kept]

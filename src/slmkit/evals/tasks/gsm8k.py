"""GSM8K: grade-school math word problems, answered by greedy chain-of-thought generation."""

from __future__ import annotations

import re

from slmkit.evals.tasks.base import Docs, GenerateTask, read_jsonl

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


class Gsm8k(GenerateTask):
    """GSM8K (test; 5-shot from train by default). Harness task `gsm8k`: "Question: {question}\\nAnswer:"
    followed, in few-shot examples, by the worked answer ending in "#### N"; greedy generation
    until "Question:", "</s>" or "<|im_end|>" (256 tokens at most). Two answer extractions:
    strict-match, the number after "#### ", and flexible-extract, the last number in the output;
    each is an exact match against the gold number after removing commas, "$", the text up to
    "#### " and a final period."""

    name = "gsm8k"
    metrics = ("exact_match_strict", "exact_match_flexible")
    default_shots = 5
    until = ("Question:", "</s>", "<|im_end|>")
    max_new_tokens = 256

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "gsm8k" / "test.jsonl", _valid)

    def fewshot_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "gsm8k" / "train.jsonl", _valid)

    def text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def target(self, doc: dict) -> str:
        return doc["answer"]

    def score(self, doc: dict, output: str) -> dict[str, float]:
        gold = _normalise(doc["answer"])
        return {"exact_match_strict": float(_normalise(strict_answer(output)) == gold),
                "exact_match_flexible": float(_normalise(flexible_answer(output)) == gold)}


def _valid(row: dict) -> bool:
    return bool(row["question"]) and STRICT.search(row["answer"]) is not None


def strict_answer(text: str) -> str:
    match = STRICT.search(text)
    return match.group(1) if match else "[invalid]"


def flexible_answer(text: str) -> str:
    matches = FLEXIBLE.findall(text)
    if not matches:
        return "[invalid]"
    last = matches[-1]
    return last[0] or last[1]


def _normalise(text: str) -> str:
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()

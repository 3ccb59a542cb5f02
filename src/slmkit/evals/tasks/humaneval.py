"""HumanEval: write the body of a Python function; pass@1 by running its unit tests, fenced in."""

from __future__ import annotations

from slmkit.errors import SlmError
from slmkit.evals.sandbox import run_untrusted
from slmkit.evals.tasks.base import Docs, GenerateTask, read_jsonl


class HumanEval(GenerateTask):
    """HumanEval (the shared problems). Harness task `humaneval`: the prompt is the function's
    signature and docstring, greedy generation until "\\nclass", "\\ndef", "\\n#", "\\nif" or
    "\\nprint"; the program prompt + completion + "\\n" + test + "\\ncheck(entry_point)" passes
    if it exits cleanly. Each program runs in `evals.sandbox` (its own process, a timeout, a
    memory cap, no network); one that loops or allocates without bound is killed and counts as
    failed. pass@1 with one greedy sample = the share of problems passed. We cap generation at
    512 tokens (the harness allows 1024; a small model that has not stopped by then rambles)."""

    name = "humaneval"
    metrics = ("pass@1",)
    until = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    max_new_tokens = 512
    timeout = 10.0

    def eval_docs(self) -> Docs:
        return read_jsonl(self.data_dir / "humaneval" / "HumanEval.jsonl.gz",
                          lambda r: all(isinstance(r[k], str) for k in ("prompt", "test", "entry_point")))

    def text(self, doc: dict) -> str:
        return doc["prompt"]

    def target(self, doc: dict) -> str:
        return doc.get("canonical_solution", "")

    def fewshot_example(self, doc: dict) -> str:
        raise SlmError("humaneval is 0-shot; use --shots 0")

    def program(self, doc: dict, completion: str) -> str:
        return doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})\n"

    def score(self, doc: dict, output: str) -> dict[str, float]:
        return {"pass@1": float(run_untrusted(self.program(doc, output), self.timeout).passed)}

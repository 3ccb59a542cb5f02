"""Run tasks against a model: few-shot contexts, batched scoring, per-task metrics with stderr.

Reproducibility: document i of a task always gets the same few-shot examples (drawn with a
random.Random seeded by (seed, task, i), so --limit does not change them), requests are scored
in a fixed order, and scores are rounded before comparison (see `evals.lm`), so a result does not
depend on the batch size or on the run.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

from slmkit.evals.tasks.base import GenerateTask, MultipleChoiceTask, Task, TaskResult

DEFAULT_SEED = 1234


def fewshot_context(task: Task, doc: dict, index: int, shots: int, seed: int, pool: list[dict] | None) -> str:
    """The text before the document's own prompt: description + k examples + delimiters, as
    lm-evaluation-harness lays them out (`Task.context`; chat tasks render turns instead)."""
    examples = []
    if shots:
        examples = task.fewshot_examples(doc, pool, shots, random.Random(f"{seed}:{task.name}:{index}"))
    return task.context(doc, examples)


def run_task(lm, task: Task, shots: int, limit: int | None = None, seed: int = DEFAULT_SEED,
             progress: bool = True, on_docs: Callable[[int], None] | None = None) -> TaskResult:
    started = time.perf_counter()
    if getattr(task, "needs_tokenizer", False):  # chat tasks render prompts with the model's own template
        task.bind(getattr(lm, "tokenizer", None))
    docs = task.eval_docs()
    rows = first_docs(task, docs.rows, limit)
    pool = task.fewshot_docs().rows if shots else None
    contexts = [fewshot_context(task, doc, i, shots, seed, pool) for i, doc in enumerate(rows)]
    if task.kind == "label":
        per_doc, truncated = _label_set(lm, task, rows, contexts, progress)
    elif isinstance(task, MultipleChoiceTask):
        per_doc, truncated = _multiple_choice(lm, task, rows, contexts, progress)
    elif isinstance(task, GenerateTask):
        per_doc, truncated = _generate(lm, task, rows, contexts, progress)
    else:
        raise TypeError(f"{task.name}: unknown task kind {task.kind}")
    metrics, stderr = aggregate(per_doc)
    result = TaskResult(task.name, shots, len(rows), metrics, stderr, time.perf_counter() - started,
                        docs.skipped, truncated)
    if docs.skipped:
        result.extra["first_bad_row"] = docs.first_bad
    summarize = getattr(task, "summarize", None)  # scores of the whole set (macro-F1) and what to keep
    if summarize is not None:
        more, more_stderr, extra = summarize(rows, per_doc)
        result.metrics.update(more)
        result.stderr.update(more_stderr)
        result.extra.update(extra)
    grouped = getattr(task, "group_of", None)
    if grouped is not None:
        result.extra.update(group_metrics([grouped(d) for d in rows], per_doc))
        result.metrics["acc_macro"] = result.extra["macro_acc"]
    return result


def first_docs(task: Task, rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` documents; for a task of groups (MMLU's subjects) the first `limit` of each."""
    if not limit:
        return rows
    group_of = getattr(task, "group_of", None)
    if group_of is None:
        return rows[:limit]
    seen: dict[str, int] = {}
    kept = []
    for doc in rows:
        group = group_of(doc)
        if seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            kept.append(doc)
    return kept


def choice_requests(task: MultipleChoiceTask, rows, contexts) -> tuple[list, list[tuple[int, int]]]:
    """Every document's requests in one list, and each document's (start, count) in it."""
    spans, flat = [], []
    for doc, context in zip(rows, contexts):
        requests = task.requests(doc, context)
        spans.append((len(flat), len(requests)))
        flat.extend(requests)
    return flat, spans


def _multiple_choice(lm, task: MultipleChoiceTask, rows, contexts, progress) -> tuple[list[dict], int]:
    flat, spans = choice_requests(task, rows, contexts)
    scores = lm.loglikelihood(flat, progress=progress)
    per_doc = []
    for doc, (start, count) in zip(rows, spans):
        mine = scores[start : start + count]
        per_doc.append(task.score(doc, [s.logprob for s in mine], [s.greedy for s in mine]))
    return per_doc, sum(any(s.truncated for s in scores[a : a + c]) for a, c in spans)


def _generate(lm, task: GenerateTask, rows, contexts, progress) -> tuple[list[dict], int]:
    prompts = [task.prompt(doc, context) for doc, context in zip(rows, contexts)]
    outputs = lm.generate_until(prompts, list(task.until), task.max_new_tokens, progress=progress)
    per_doc = [task.score(doc, text) for doc, (text, _) in zip(rows, outputs)]
    return per_doc, sum(t for _, t in outputs)


def _label_set(lm, task, rows, contexts, progress) -> tuple[list[dict], int]:
    """A closed label set, scored by log-likelihood (acc) and by the free answer (exact match,
    hallucination) on the same prompts."""
    per_doc, truncated = _multiple_choice(lm, task, rows, contexts, progress)
    outputs = lm.generate_until([task.prompt(d, c) for d, c in zip(rows, contexts)], list(task.until),
                                task.max_new_tokens, progress=progress)
    for values, doc, (text, _) in zip(per_doc, rows, outputs):
        values.update(task.score_answer(doc, text))
    return per_doc, truncated


def aggregate(per_doc: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean of each metric and its standard error (sample stdev / sqrt(n), as lm-evaluation-harness);
    a per-document value whose name starts with "_" (a predicted label, an answer) is not a metric."""
    if not per_doc:
        return {}, {}
    metrics, stderr = {}, {}
    for name in (n for n in per_doc[0] if not n.startswith("_")):
        values = [d[name] for d in per_doc]
        metrics[name] = statistics.fmean(values)
        stderr[name] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return metrics, stderr


def group_metrics(groups: list[str], per_doc: list[dict[str, float]]) -> dict:
    """Per-group accuracy and n (MMLU's subjects) and their unweighted (macro) mean."""
    by_group: dict[str, list[float]] = {}
    for g, d in zip(groups, per_doc):
        by_group.setdefault(g, []).append(d["acc"])
    subjects = {g: {"acc": statistics.fmean(v), "n": len(v)} for g, v in sorted(by_group.items())}
    return {"groups": subjects, "macro_acc": statistics.fmean(s["acc"] for s in subjects.values())}

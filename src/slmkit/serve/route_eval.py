"""`slm route-eval`: what the confidence router would buy on a labelled multiple-choice set.

For each document the local model picks its answer (the task's own metric: acc, or acc_norm by
bytes) and its confidence is the mean token log-probability of that answer, the same signal the
router reads from a local draft. The remote model (an OpenAI-compatible URL, or a model slmkit
loads) answers every document too, so each threshold's outcome is exact without re-running:
escalate where confidence < threshold, take the remote's answer there and the local one elsewhere.
The result is accuracy and share escalated per threshold: a quality-vs-escalation curve (JSON + PNG).
"""

from __future__ import annotations

from pathlib import Path

from slmkit.errors import SlmError
from slmkit.evals.runner import DEFAULT_SEED, choice_requests, fewshot_context, first_docs
from slmkit.evals.tasks.base import MultipleChoiceTask
from slmkit.fileio import write_json
from slmkit.plots import pyplot, save_png


def route_eval(local_lm, remote_lm, task, limit: int | None, thresholds: list[float] | None,
               seed: int = DEFAULT_SEED, progress: bool = True) -> dict:
    """thresholds None: the deciles of the local confidences (every point of the curve is then
    informative, whatever the local model's scale of log-probabilities)."""
    if not isinstance(task, MultipleChoiceTask):
        raise SlmError(f"route-eval scores multiple-choice tasks; '{task.name}' is not one")
    rows = first_docs(task, task.eval_docs().rows, limit)
    contexts = [fewshot_context(task, doc, i, 0, seed, None) for i, doc in enumerate(rows)]
    requests, spans = choice_requests(task, rows, contexts)
    local = local_lm.loglikelihood(requests, progress=progress)
    remote = remote_lm.loglikelihood(requests, progress=progress)
    metric = "acc_norm" if "acc_norm" in task.metrics else "acc"
    docs = []
    for doc, (start, count) in zip(rows, spans):
        mine_local, mine_remote = local[start:start + count], remote[start:start + count]
        pick = task.chosen(doc, [s.logprob for s in mine_local], per_byte=metric == "acc_norm")
        docs.append({"confidence": mine_local[pick].logprob / max(mine_local[pick].tokens, 1),
                     "local": task.score(doc, [s.logprob for s in mine_local], [s.greedy for s in mine_local])[metric],
                     "remote": task.score(doc, [s.logprob for s in mine_remote],
                                          [s.greedy for s in mine_remote])[metric]})
    if thresholds is None:
        thresholds = deciles([d["confidence"] for d in docs])
    return {"task": task.name, "metric": metric, "n": len(docs), "curve": curve(docs, thresholds),
            "local_only": _mean([d["local"] for d in docs]), "remote_only": _mean([d["remote"] for d in docs]),
            "oracle": _mean([max(d["local"], d["remote"]) for d in docs]), "docs": docs}


def deciles(values: list[float]) -> list[float]:
    """Thresholds that escalate 0%, 10%, ..., 100% of these confidences (ties aside)."""
    ordered = sorted(values)
    cuts = [ordered[min(len(ordered) - 1, round(q / 10 * len(ordered)))] for q in range(1, 10)]
    return sorted({round(c, 4) for c in [ordered[0] - 1e-3, *cuts, ordered[-1] + 1e-3]})


def curve(docs: list[dict], thresholds: list[float]) -> list[dict]:
    """Accuracy and share escalated when documents below each confidence threshold go remote."""
    points = []
    for t in sorted(thresholds):
        escalated = [d["confidence"] < t for d in docs]
        points.append({"threshold": t, "escalated": _mean(escalated),
                       "accuracy": _mean([d["remote"] if e else d["local"] for d, e in zip(docs, escalated)])})
    return points


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def save(result: dict, out: Path, local_name: str, remote_name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "local": local_name, "remote": remote_name}
    path = out / f"route-eval-{result['task']}.json"
    write_json(path, result)
    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    xs = [p["escalated"] for p in result["curve"]]
    ys = [p["accuracy"] for p in result["curve"]]
    ax.plot(xs, ys, marker="o", label="confidence router")
    for p in result["curve"]:
        ax.annotate(f"{p['threshold']:.2f}", (p["escalated"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.axhline(result["local_only"], linestyle="--", color="gray", label=f"local only ({local_name})")
    ax.axhline(result["remote_only"], linestyle=":", color="black", label=f"remote only ({remote_name})")
    ax.set_xlabel("share of requests escalated")
    ax.set_ylabel(f"{result['task']} {result['metric']}")
    ax.set_title(f"Routing: quality vs escalation (n={result['n']}; labels: threshold)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return path, save_png(fig, out / f"route-eval-{result['task']}.png")

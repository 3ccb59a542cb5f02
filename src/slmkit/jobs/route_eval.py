"""`slm route-eval` as a job: score a local and a remote model on a multiple-choice task and
write, per confidence threshold, the accuracy and share escalated a confidence router would get.

The scoring and the curve are serve/route_eval.py's; this module turns the settings into the two
scorers and says where the results went."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slmkit.errors import SlmError
from slmkit.evals.api import default_data_dir
from slmkit.evals.endpoint import EndpointLM
from slmkit.evals.tasks import make_task
from slmkit.jobs.evaluate import eval_lm
from slmkit.runtime import Runtime, use_threads
from slmkit.serve.remote import RemoteBackend
from slmkit.serve.route_eval import route_eval, save


@dataclass
class RouteEvalJob:
    local: str = ""
    """the local model (anything slmkit loads)"""
    remote: str = ""
    """the larger model: URL[,model=NAME,key=ENV_VAR] of an OpenAI-compatible server, or a model slmkit loads"""
    task: str = "arc_easy"
    """a multiple-choice task (slm eval's names)"""
    limit: int | None = 200
    """documents scored (None = all)"""
    thresholds: list[float] | None = None
    """mean-token-log-prob thresholds (default: the deciles of the local model's confidences)"""
    data_dir: str | None = None
    """eval data folder (default: ../shared/data/eval)"""
    out: str = field(default="runs/route-eval", metadata={"flag": ("-o", "--out")})
    """output folder (route-eval-TASK.json and .png)"""
    runtime: Runtime = field(default_factory=lambda: Runtime(engine="torch", dtype="float32"))
    """how a model slmkit loads runs (as in slm eval)"""


def _scorer(spec: str, runtime: Runtime):
    """(scorer, display name) of a URL or of a model slmkit loads."""
    if spec.startswith(("http://", "https://")):
        remote = RemoteBackend.from_spec(spec)
        return EndpointLM(remote.url, remote.model or "default", remote.key), remote.name
    return eval_lm(spec, runtime)[0], Path(spec.rstrip("/")).name


def run_route_eval(job: RouteEvalJob) -> tuple[dict, Path, Path]:
    """(result, its JSON, its PNG curve)."""
    if not job.local or not job.remote:
        raise SlmError("give both models: --local MODEL --remote URL[,model=NAME,key=ENV_VAR]")
    use_threads(job.runtime.threads)
    task = make_task(job.task, Path(job.data_dir) if job.data_dir else default_data_dir())
    (local, local_name), (remote, remote_name) = _scorer(job.local, job.runtime), _scorer(job.remote, job.runtime)
    result = route_eval(local, remote, task, job.limit, job.thresholds)
    path, png = save(result, Path(job.out), local_name, remote_name)
    return result, path, png


def route_eval_verb(job: RouteEvalJob) -> None:
    """`slm route-eval`: the curve as a table, and where its JSON and PNG went."""
    result, path, png = run_route_eval(job)
    table = Table(title=f"{result['task']} {result['metric']} (n={result['n']}): local only "
                        f"{result['local_only']:.3f}, remote only {result['remote_only']:.3f}")
    for column in ("threshold", "escalated", "accuracy"):
        table.add_column(column, justify="right")
    for point in result["curve"]:
        table.add_row(f"{point['threshold']:g}", f"{point['escalated']:.1%}", f"{point['accuracy']:.3f}")
    Console().print(table)
    print(f"wrote {path} and {png}")

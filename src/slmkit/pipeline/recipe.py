"""Reading a pipeline recipe: YAML + `key=value` overrides into a `PipelineConfig`, with the paths
that join the stages refused when a section sets them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from slmkit.config import apply_overrides, from_dict
from slmkit.errors import SlmError
from slmkit.pipeline.config import JOINED, PipelineConfig

# evaluate.eval fields the evaluate stage sets for each model it scores
EVAL_SET_PER_STAGE = ("model", "tasks", "limit", "output", "perplexity", "endpoint")


@dataclass
class Recipe:
    cfg: PipelineConfig
    raw: dict  # the recipe as written (overrides applied): which keys the user set
    text: str  # the YAML as written, for the report and the model card

    @property
    def root(self) -> Path:
        return Path(self.cfg.out or Path("runs") / self.cfg.name)


def read_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"pipeline recipe '{path}' not found (see configs/pipeline/ for examples)")
    written = path.read_text()
    try:
        data = yaml.safe_load(written) or {}
    except yaml.YAMLError as err:
        raise SlmError(f"'{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    raw = apply_overrides(data, list(overrides))
    _refuse_joined(raw)
    cfg = from_dict(PipelineConfig, raw)
    if not cfg.name:
        cfg.name = path.stem
    text = written + "".join(f"# override: {o}\n" for o in overrides)
    return Recipe(cfg, raw, text)


def _refuse_joined(raw: dict) -> None:
    for section, keys in JOINED.items():
        given = raw.get(section)
        for key in keys if isinstance(given, dict) else ():
            if key in given:
                raise SlmError(f"{section}.{key} is set by the pipeline (it joins {section} to the stage before "
                               f"it); remove it from the recipe")
    evaluate = raw.get("evaluate")
    scoring = evaluate.get("eval") if isinstance(evaluate, dict) else None
    for key in EVAL_SET_PER_STAGE if isinstance(scoring, dict) else ():
        if key in scoring:
            raise SlmError(f"evaluate.eval.{key} is set for each stage by the pipeline; choose tasks with "
                           "evaluate.task and evaluate.general, and limits with evaluate.task_limit/general_limit")
    export = raw.get("export")
    gguf = export.get("gguf") if isinstance(export, dict) else None
    for key in ("model", "out") if isinstance(gguf, dict) else ():
        if key in gguf:
            raise SlmError(f"export.gguf.{key} is set by the pipeline (the final model, into the export stage's "
                           "directory); remove it")

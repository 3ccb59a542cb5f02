"""Reading a pipeline recipe: YAML + `key=value` overrides into a `PipelineConfig`, with the paths
that join the stages refused when a section sets them."""

from __future__ import annotations

from pathlib import Path

from slmkit.config import apply_overrides, from_dict, parse_yaml
from slmkit.errors import SlmError
from slmkit.pipeline.config import PipelineConfig, Recipe
from slmkit.pipeline.stages import STAGES


def read_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    if not str(path):
        raise SlmError("give the pipeline RECIPE (a YAML file, e.g. configs/pipeline/symptom2disease.yaml)")
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"pipeline recipe '{path}' not found (see configs/pipeline/ for examples)")
    written = path.read_text()
    data = parse_yaml(written, f"'{path}'") or {}
    if not isinstance(data, dict):
        raise SlmError(f"pipeline recipe '{path}' holds a {type(data).__name__}, not a mapping of stages")
    raw = apply_overrides(data, list(overrides))
    _refuse_joined(raw)
    cfg = from_dict(PipelineConfig, raw)
    if not cfg.name:
        cfg.name = path.stem
    text = written + "".join(f"# override: {o}\n" for o in overrides)
    return Recipe(cfg, raw, text)


def _refuse_joined(raw: dict) -> None:
    """A recipe may not set the fields the pipeline joins (each stage's `joined`, dotted into sub-sections)."""
    for stage in STAGES:
        for key in stage.joined:
            section, *path, leaf = [stage.kind, *key.split(".")]
            node = raw.get(section)
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                raise SlmError(f"{section}.{key} is set by the pipeline ({stage.joins}); remove it from the recipe")

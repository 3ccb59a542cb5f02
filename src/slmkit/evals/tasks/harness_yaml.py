"""lm-evaluation-harness task YAMLs from a local folder: `slm eval --include-path DIR --tasks NAME`.

Users who keep their evaluations in the harness's format run them unchanged, offline: the
`multiple_choice` and `generate_until` output types over local files (`dataset_path: json` or
`csv` with `dataset_kwargs.data_files`, or a path), with the harness's semantics for
    doc_to_text / doc_to_target / doc_to_choice   a field name, a Jinja template, an index or a list
    description, target_delimiter (" "), fewshot_delimiter ("\\n\\n"), num_fewshot
    test_split (else validation_split) scored; few-shot from fewshot_split, training_split or
    validation_split; generation_kwargs.until / max_gen_toks; `include:` of a base YAML
    metric_list: acc, acc_norm (multiple choice); exact_match with ignore_case,
    ignore_punctuation and regexes_to_ignore (generation; both texts stripped of outer spaces)
    filter_list: regex (regex_pattern, group_select), take_first, remove_whitespace, lowercase, uppercase
Written here rather than by importing lm_eval, which would bring `datasets` (and the Hub) into
the core for what is a YAML reader and a template renderer. Anything a YAML asks that is not
supported (a `!function`, another output type, metric or filter, a Hub dataset) is refused with
its file and key, never silently ignored.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import string
from pathlib import Path

import yaml
from jinja2 import BaseLoader, Environment, StrictUndefined
from jinja2.exceptions import TemplateError

from slmkit.data.readers import json_records
from slmkit.errors import SlmError
from slmkit.evals.tasks.base import Docs, GenerateTask, MultipleChoiceTask, Task

OUTPUT_TYPES = ("multiple_choice", "generate_until")
CHOICE_METRICS = ("acc", "acc_norm")
GENERATE_METRICS = ("exact_match",)
FILTERS = ("regex", "take_first", "remove_whitespace", "lowercase", "uppercase")
KNOWN_KEYS = {"task", "tag", "group", "include", "dataset_path", "dataset_name", "dataset_kwargs", "test_split",
              "validation_split", "training_split", "fewshot_split", "output_type", "doc_to_text", "doc_to_target",
              "doc_to_choice", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "metric_list",
              "generation_kwargs", "filter_list", "metadata", "should_decontaminate", "doc_to_decontamination_query",
              "fewshot_config", "repeats"}
LOCAL_FORMATS = ("json", "csv")


class FunctionTag(str):
    """`!function module.name` in a YAML: Python code, which slmkit does not run."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionTag(loader.construct_scalar(node)))
_JINJA = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = lambda s, pattern, repl: re.sub(pattern, repl, s)


def harness_tasks(folder: str | Path) -> dict[str, Task]:
    """Every task YAML under `folder` (recursively), by its `task` name; a file without `task`
    (a base that others `include`) is not a task itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SlmError(f"--include-path '{folder}' is not a folder of lm-evaluation-harness task YAMLs")
    tasks = {}
    for path in sorted(folder.rglob("*.yaml")):
        config = read_config(path)
        name = config.get("task")
        if isinstance(name, list):
            raise SlmError(f"{path}: 'task' lists a group of tasks; give each task its own YAML")
        if name:
            if name in tasks:
                raise SlmError(f"{path}: task '{name}' is also defined in another YAML of {folder}")
            tasks[name] = harness_task(config, path)
    if not tasks:
        raise SlmError(f"no task YAML (a file with a 'task:' key) under '{folder}'")
    return tasks


def read_config(path: Path, seen: tuple = ()) -> dict:
    """The YAML with its `include:` chain merged under it (the including file wins)."""
    if path in seen:
        raise SlmError(f"{path}: 'include' loops back to itself")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise SlmError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SlmError(f"{path}: a task YAML is a mapping of keys (task, dataset_path, doc_to_text, ...)")
    base = config.pop("include", None)
    if base:
        config = {**read_config(path.parent / base, seen + (path,)), **config}
    return config


def harness_task(config: dict, path: Path) -> Task:
    """The task one YAML describes, checked before any model loads."""
    where = f"{path}"
    for key, value in config.items():
        if isinstance(value, FunctionTag) or (isinstance(value, list) and any(isinstance(v, FunctionTag) for v in value)):
            raise SlmError(f"{where}: '{key}: !function {value}' runs Python code, which slmkit does not; write it as "
                           "a field name or a Jinja template")
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise SlmError(f"{where}: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(sorted(KNOWN_KEYS))})")
    kind = config.get("output_type", "generate_until")
    if kind not in OUTPUT_TYPES:
        raise SlmError(f"{where}: output_type '{kind}' is not supported (choose from {', '.join(OUTPUT_TYPES)})")
    splits = read_splits(config, path)
    test = config.get("test_split") or config.get("validation_split")
    if not test or test not in splits:
        raise SlmError(f"{where}: the scored split ('{test}', from test_split or validation_split) has no data file; "
                       f"data_files gives: {', '.join(splits) or 'none'}")
    cls = HarnessChoice if kind == "multiple_choice" else HarnessGenerate
    return cls(config, path, splits, test)


def read_splits(config: dict, path: Path) -> dict[str, list[Path]]:
    """Split name -> local files, from `dataset_path` and `dataset_kwargs.data_files`."""
    source = config.get("dataset_path")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if source not in LOCAL_FORMATS:
        local = (path.parent / str(source)) if source else None
        if local is None or not local.exists():
            raise SlmError(f"{path}: dataset_path '{source}' is not a local file or folder; slmkit reads local data "
                           "only (dataset_path: json or csv with dataset_kwargs.data_files: {test: FILE})")
        if files is None:
            files = {config.get("test_split") or "test": str(local)} if local.is_file() else None
        if files is None:
            raise SlmError(f"{path}: dataset_path '{source}' is a folder; name its files in dataset_kwargs.data_files")
    if isinstance(files, (str, list)):
        files = {"train": files}
    if not isinstance(files, dict) or not files:
        raise SlmError(f"{path}: dataset_kwargs.data_files must map split names to files")
    out = {}
    for split, names in files.items():
        names = [names] if isinstance(names, str) else list(names)
        out[split] = [p if p.is_absolute() else path.parent / p for p in map(Path, names)]
        for p in out[split]:
            if not p.is_file():
                raise SlmError(f"{path}: data file '{p}' (split {split}) not found")
    return out


def read_rows(files: list[Path]) -> list[dict]:
    """Rows of local JSON Lines, JSON (a list of objects) or CSV files, in order."""
    rows = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".csv":
            rows += list(csv.DictReader(text.splitlines()))
        elif text.lstrip().startswith("["):
            rows += json.loads(text)
        else:
            rows += [row for _, row in json_records(file)]
    return rows


class HarnessTask:
    """The harness's `ConfigurableTask` rules for documents, prompts and targets."""

    def _setup(self, config: dict, path: Path, splits: dict[str, list[Path]], test: str) -> None:
        self.config, self.path, self.splits, self.test = config, path, splits, test
        self.name = config["task"]
        self.default_shots = int(config.get("num_fewshot") or 0)
        self.target_delimiter = config.get("target_delimiter", " ")
        self.fewshot_delimiter = config.get("fewshot_delimiter", "\n\n")
        self._rows: dict[str, list[dict]] = {}

    def _split(self, name: str) -> Docs:
        if name not in self._rows:
            self._rows[name] = [{**row, "_index": i} for i, row in enumerate(read_rows(self.splits[name]))]
        return Docs(self._rows[name])

    def eval_docs(self) -> Docs:
        return self._split(self.test)

    def fewshot_docs(self) -> Docs:
        c = self.config
        split = next((c.get(k) for k in ("fewshot_split", "training_split", "validation_split")
                      if c.get(k) and c.get(k) in self.splits and c.get(k) != self.test), None)
        if split is None:
            raise SlmError(f"{self.path}: no split to draw few-shot examples from (fewshot_split, training_split "
                           "or validation_split with a data file); use --shots 0")
        return self._split(split)

    def render(self, key: str, doc: dict):
        """A doc_to_* value: a field name, a template, or a constant (an index, a list)."""
        spec = self.config.get(key)
        if spec is None:
            raise SlmError(f"{self.path}: '{key}' is missing")
        if isinstance(spec, (int, list, dict)):
            return spec
        if spec in doc:
            return doc[spec]
        try:
            return _JINJA.from_string(str(spec)).render(**doc)
        except TemplateError as err:
            raise SlmError(f"{self.path}: {key} failed on row {doc.get('_index')}: {err}") from None

    def description(self, doc: dict) -> str:
        return self.render("description", doc) if self.config.get("description") else ""

    def text(self, doc: dict) -> str:
        return str(self.render("doc_to_text", doc))

    def raw_target(self, doc: dict):
        target = self.render("doc_to_target", doc)
        if isinstance(target, str) and self.config.get("doc_to_choice") is not None and target.strip().isdigit():
            return int(target)
        if isinstance(target, str) and len(target) >= 2 and target[0] == "[" and target[-1] == "]":
            return ast.literal_eval(target)
        return target


class HarnessChoice(HarnessTask, MultipleChoiceTask):
    def __init__(self, config: dict, path: Path, splits: dict, test: str):
        MultipleChoiceTask.__init__(self, path.parent)
        self._setup(config, path, splits, test)
        metrics = [m.get("metric") for m in config.get("metric_list") or [{"metric": "acc"}, {"metric": "acc_norm"}]]
        bad = [m for m in metrics if m not in CHOICE_METRICS]
        if bad:
            raise SlmError(f"{path}: metric {bad[0]} is not supported for multiple_choice (choose from "
                           f"{', '.join(CHOICE_METRICS)})")
        if config.get("doc_to_choice") is None:
            raise SlmError(f"{path}: a multiple_choice task needs doc_to_choice")
        self.metrics = tuple(dict.fromkeys(["acc", *metrics]))

    def choices(self, doc: dict) -> list[str]:
        choices = self.render("doc_to_choice", doc)
        if isinstance(choices, str):
            choices = ast.literal_eval(choices)
        if isinstance(choices, dict):
            choices = list(choices.values())
        return [str(c) for c in choices]

    def gold(self, doc: dict) -> int:
        target = self.raw_target(doc)
        if isinstance(target, str):
            choices = self.choices(doc)
            if target not in choices:
                raise SlmError(f"{self.path}: row {doc.get('_index')}: target '{target}' is not one of its choices")
            return choices.index(target)
        return int(target)

    def target(self, doc: dict) -> str:
        return self.choices(doc)[self.gold(doc)]


class HarnessGenerate(HarnessTask, GenerateTask):
    def __init__(self, config: dict, path: Path, splits: dict, test: str):
        GenerateTask.__init__(self, path.parent)
        self._setup(config, path, splits, test)
        gen = config.get("generation_kwargs") or {}
        until = gen.get("until", [self.fewshot_delimiter])
        self.until = tuple([until] if isinstance(until, str) else until)
        self.max_new_tokens = int(gen.get("max_gen_toks", 256))
        self.match = {}
        for m in config.get("metric_list") or [{"metric": "exact_match"}]:
            if m.get("metric") not in GENERATE_METRICS:
                raise SlmError(f"{path}: metric {m.get('metric')} is not supported for generate_until (choose from "
                               f"{', '.join(GENERATE_METRICS)})")
            self.match = m
        self.filters = read_filters(config.get("filter_list"), path)

    def target(self, doc: dict) -> str:
        return str(self.raw_target(doc))

    def score(self, doc: dict, output: str) -> dict[str, float]:
        answer = apply_filters(self.filters, output)
        return {"exact_match": float(_canonical(answer, self.match) == _canonical(self.target(doc), self.match))}


def read_filters(filter_list, path: Path) -> list[dict]:
    """The first filter pipeline's steps (the harness scores each pipeline apart; one is supported)."""
    if not filter_list:
        return []
    if len(filter_list) > 1:
        raise SlmError(f"{path}: filter_list has {len(filter_list)} pipelines; slmkit supports one")
    steps = filter_list[0].get("filter") or []
    for step in steps:
        if step.get("function") not in FILTERS:
            raise SlmError(f"{path}: filter '{step.get('function')}' is not supported (choose from {', '.join(FILTERS)})")
    return steps


def apply_filters(steps: list[dict], text: str) -> str:
    for step in steps:
        kind = step["function"]
        if kind == "regex":
            match = re.findall(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), text)
            if not match:
                text = step.get("fallback", "[invalid]")
            else:
                found = match[step.get("group_select", 0)]
                text = (next((m for m in found if m), found[0]) if isinstance(found, tuple) else found).strip()
        elif kind == "remove_whitespace":
            text = text.lstrip()
        elif kind == "lowercase":
            text = text.lower()
        elif kind == "uppercase":
            text = text.upper()
    return text


def _canonical(text: str, options: dict) -> str:
    """exact_match's options (as Hugging Face evaluate's): regexes_to_ignore, ignore_case, ignore_punctuation."""
    for pattern in options.get("regexes_to_ignore") or []:
        text = re.sub(pattern, "", text)
    if options.get("ignore_case"):
        text = text.lower()
    if options.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text.strip()

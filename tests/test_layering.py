"""The package's layering holds: no import cycles, no upward imports, no import hidden in a function
(but the few packages worth deferring, LAZY).

The import graph is read from the source (ast, nothing is imported) and counts every import of an
slmkit module, at module level and inside functions alike: `import slmkit.x`, `from slmkit.x import y`
(an edge to `slmkit.x.y` when that is a submodule), `from slmkit import x`, and relative imports.
Importing a package is an edge to its `__init__`; the parent packages a submodule import also runs
are not counted (a package `__init__` that imports its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "slmkit"

# Layers, lowest first. A module may import modules of its own layer and of the layers below it,
# never one above. Names are relative to `slmkit`; "" is `slmkit/__init__.py`; "pkg.*" is a package
# and everything under it (the most specific entry wins). Every module must be placed here.
LAYERS: dict[str, list[str]] = {
    # What everything builds on: the model definition and the things it needs, and the data
    # readers/batchers that training uses. Imports nothing from the layers above.
    "foundation": [
        "", "errors", "config", "fileio", "presets", "sizing", "tokenizer", "toolcalls", "layers", "rope", "model", "runtime",
        "plots",
        "data", "data.calibration", "data.dedup", "data.filters", "data.loader", "data.readers",
        "data.preference", "data.shards", "data.sft", "data.sft_batches", "data.shared", "data.tasks",
    ],
    # Surgery on a model: compression, and the Linear variants adapters add (an adapter wraps a
    # quantized linear, and merging requantizes, so adapters and compress share a layer).
    "compress": ["adapters.*", "compress.*"],
    # Files in and out: HF directories, GGUF, and turning a MODEL argument into a model (load.py).
    "formats": ["interop.*", "load"],
    # Running a model on token ids, and text generation over it.
    "infer": ["infer.*", "generate"],
    # Recipes that use the layers below. `slm prepare` (data.prepare) tokenizes with any MODEL's
    # tokenizer (load.load_tokenizer) and `slm synth` (data.synth) generates with a teacher, so
    # those two data modules sit here, above load and generate, not with the rest of data/.
    "train_evals": ["train.*", "evals.*", "data.prepare", "data.synth"],
    # The HTTP server and the router.
    "serve": ["serve.*"],
    # The commands as library calls: one typed config and one function per verb, and the terminal
    # tables and chat loop they print through.
    "jobs": ["jobs.*", "chat", "card"],
    # `slm pipeline`: stages are the jobs' own configs.
    "pipeline": ["pipeline.*"],
    # What a user runs: the CLI (its flags generated from the configs) and the programs it starts.
    "apps": ["cli", "cli_args"],
}
OPTIONAL: set[str] = set()  # entries allowed to match nothing (a package being added)
RANK = {layer: i for i, layer in enumerate(LAYERS)}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    local: bool  # inside a function (a lazy import)

    def where(self) -> str:
        return f"{self.source.replace('.', '/')}.py:{self.line}{' (in a function)' if self.local else ''}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
PACKAGES = {_module_name(p) for p in (SRC / PACKAGE).rglob("__init__.py")}


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return True
    return False


def _known(name: str) -> str:
    """The module `name` runs: itself, else its longest prefix that is a module (an attribute import)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if module in PACKAGES else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str, source: str | None = None) -> list[Import]:
    """The slmkit modules `module` imports (its file, or `source` read as if it were that module)."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source, str(MODULES[module]))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for target in _targets(module, node):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                target = _known(target)
                if target != module:
                    found.append(Import(module, target, node.lineno, _in_function(node, parents)))
    return found


def _local_imports(module: str, full: bool = False) -> list[tuple[str, int]]:
    """(top-level package, or with `full` the dotted name, line) of every import inside a function of
    `module`, slmkit's own included."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and _in_function(node, parents):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(PACKAGE if getattr(node, "level", 0) else n if full else n.split(".")[0], node.lineno)
                      for n in names]
    return found


IMPORTS = [imp for module in MODULES for imp in _imports(module)]
GRAPH: dict[str, list[Import]] = defaultdict(list)
for _imp in IMPORTS:
    GRAPH[_imp.source].append(_imp)


def _entry(module: str) -> str | None:
    """The most specific LAYERS entry that places `module`, or None."""
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    best = None
    for entries in LAYERS.values():
        for entry in entries:
            if entry == rel:
                return entry
            pkg = entry.removesuffix(".*")
            if entry.endswith(".*") and (rel == pkg or rel.startswith(pkg + ".")):
                if best is None or len(pkg) > len(best.removesuffix(".*")):
                    best = entry
    return best


def layer_of(module: str) -> str:
    entry = _entry(module)
    return next(layer for layer, entries in LAYERS.items() if entry in entries)


def _path(start: str, goal: str) -> list[Import] | None:
    """A shortest chain of imports from `start` to `goal` (breadth first), or None."""
    seen, frontier = {start}, [(start, [])]
    while frontier:
        nxt = []
        for module, chain in frontier:
            for imp in GRAPH[module]:
                if imp.target == goal:
                    return chain + [imp]
                if imp.target not in seen:
                    seen.add(imp.target)
                    nxt.append((imp.target, chain + [imp]))
        frontier = nxt
    return None


def _chain(imports: list[Import]) -> str:
    steps = [imports[0].source] + [f"-> {imp.target}  [{imp.where()}]" for imp in imports]
    return "\n      ".join(steps)


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(m for m in MODULES if _entry(m) is None)
    assert not unplaced, ("modules missing from LAYERS in tests/test_layering.py (place each in the layer its "
                          "imports allow):\n  " + "\n  ".join(unplaced))
    rel = [m.removeprefix(PACKAGE).removeprefix(".") for m in MODULES]
    stale = [e for entries in LAYERS.values() for e in entries if e not in OPTIONAL
             and not any(r == e or (e.endswith(".*") and (r + ".").startswith(e[:-1])) for r in rel)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_cycles():
    """Counting imports inside functions too: a lazy import does not make a cycle harmless."""
    cycles, covered = [], set()
    for module in MODULES:
        for imp in GRAPH[module]:
            if (imp.source, imp.target) in covered:
                continue
            back = _path(imp.target, module)
            if back is not None:
                cycle = [imp] + back
                covered.update((i.source, i.target) for i in cycle)
                cycles.append(_chain(cycle))
    assert not cycles, ("import cycles (move the function that needs the other module to where it belongs; "
                        "do not hide the import in a function):\n  " + "\n  ".join(cycles))


def test_no_module_imports_a_higher_layer():
    upward = [f"{imp.source} ({layer_of(imp.source)}) imports {imp.target} ({layer_of(imp.target)})  "
              f"[{imp.where()}]"
              for imp in IMPORTS if _entry(imp.source) and _entry(imp.target)
              and RANK[layer_of(imp.target)] > RANK[layer_of(imp.source)]]
    order = " < ".join(LAYERS)
    assert not upward, (f"imports from a lower layer to a higher one (layers: {order}); move the function, "
                        "or the module in LAYERS if the dependency is legitimate:\n  " + "\n  ".join(upward))


# The only imports allowed inside a function: packages that are optional (an extra) or slow to import
# and needed by one path only. Everything else -- slmkit's own modules above all -- is imported at the
# top of the module, where a reader sees what it depends on and the layering test sees every edge.
LAZY = {
    "matplotlib": "0.3-0.5 s, only to draw a figure (slmkit.plots); `slm --help` and the server never draw",
    "datasketch": "0.5 s (scipy), only for near-duplicate removal",
    "rouge_score": "about 1 s (nltk), only for the summary tasks' metric",
    "pyarrow": "the [data] extra: .parquet input",
    "transformers": "the [hf] extra: parity tests and benchmarks", "accelerate": "the [hf] extra",
    "peft": "the [test] extra", "llama_cpp": "the [llamacpp] extra", "sklearn": "the [bench] extra",
    "selenium": "the [test] extra", "openai": "the [test] extra", "sentencepiece": "the [test] extra",
    "torch.utils.tensorboard": "the [track] extra (tensorboard), only when train.loggers names it",
    "mlflow": "the [track] extra", "trackio": "the [track] extra",
    "executorch": "the [executorch] extra; its exporter (executorch.exir, with torchao) takes 3 s and 136 MiB to import",
    "litert_torch": "the [litert] extra (its own environment, .venv-litert)", "ai_edge_litert": "the [litert] extra",
}


def _lazy(name: str) -> bool:
    return any(name == k or name.startswith(k + ".") for k in LAZY)


def test_no_function_local_imports_but_the_lazy_list():
    """A function-local import of a module the package already loads at top level (slmkit's own, or a
    library it imports anyway) only hides a dependency; the lazy list is what is worth deferring."""
    hidden = [f"{module.replace('.', '/')}.py:{line} imports {name} in a function"
              for module in MODULES for name, line in _local_imports(module, full=True) if not _lazy(name)]
    assert not hidden, ("function-local imports (move them to the top of the module; a cycle they would make "
                        "means a function is in the wrong module):\n  " + "\n  ".join(hidden))


def test_the_graph_sees_imports_of_every_kind():
    """The parser itself: module-level, lazy, `from pkg import submodule` and package imports."""
    edges = {(i.source, i.target, i.local) for i in IMPORTS}
    assert ("slmkit.data.loader", "slmkit.errors", False) in edges  # from slmkit.errors import SlmError
    assert ("slmkit.load", "slmkit.interop.hf", False) in edges  # from slmkit.interop import hf
    assert ("slmkit.evals.api", "slmkit", False) in edges  # from slmkit import __version__
    lazy = _imports("slmkit.load", "def f():\n    from slmkit.interop import gguf\n")
    assert [(i.target, i.local) for i in lazy] == [("slmkit.interop.gguf", True)]  # the cycle check counts these

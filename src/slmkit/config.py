"""Typed configuration: dataclass trees, YAML files and `a.b=value` overrides.

Every config in slmkit is a plain dataclass. `from_dict` builds one from a nested dict and refuses
unknown keys (with the closest known name), so a typo in a YAML recipe is an error, not a silent
default. `ModelConfig` lives here too: the architecture, with field names as in a Hugging Face
`config.json`, so checkpoints map onto it without a rename table.

`walk` is the one reader of a config tree's settings: `--help`, the generated command-line flags
(slmkit.cli_args), key=value items and the unknown-key errors all come from it.

This module does not know about models, training or files beyond YAML.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from slmkit.errors import SlmError, unknown_choice

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Generic machinery: the one walker of a config tree, building one from data, YAML
# --------------------------------------------------------------------------------------------

MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Leaf:
    """One setting of a config tree: its path through the sections, type, default and docstring."""

    path: tuple[str, ...]
    hint: Any
    default: Any
    doc: str
    meta: Mapping[str, Any]

    @property
    def key(self) -> str:
        return ".".join(self.path)


def section_type(hint: Any) -> type | None:
    """The dataclass a field holds (also `Section | None`), or None for a plain setting."""
    hint = optional_of(hint)
    return hint if dataclasses.is_dataclass(hint) else None


def optional_of(hint: Any) -> Any:
    """T for `T | None`; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def walk(cls: type, defaults: Any = None, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every setting of `cls`, nested sections flattened, in field order -- the one walker that
    `--help`, the generated flags, key=value items and the unknown-key errors all read.

    defaults: an instance whose values are shown and used as the defaults (a verb may differ from
    the class, e.g. chat answers at most 512 tokens where generate writes 128)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        default = _field_default(f, defaults)
        section = section_type(hints[f.name])
        if section is not None and default is not None:
            leaves += walk(section, None if default is MISSING else default, prefix + (f.name,))
        else:
            leaves.append(Leaf(prefix + (f.name,), hints[f.name], default, docs.get(f.name, ""), f.metadata))
    return leaves


def _field_default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def setting_paths(cls: type) -> list[str]:
    """Every key a YAML file or a key=value item may set: the settings and the sections above them."""
    keys = []
    for leaf in walk(cls):
        keys += [".".join(leaf.path[:i]) for i in range(1, len(leaf.path) + 1)]
    return list(dict.fromkeys(keys))


def describe(cls: type, defaults: Any = None) -> list[str]:
    """One line per setting (nested with dots): `key (type, default): doc` -- for `--help`."""
    lines = []
    for leaf in walk(cls, defaults):
        default = "required" if leaf.default is MISSING else leaf.default
        type_name = getattr(leaf.hint, "__name__", str(leaf.hint).replace("typing.", ""))
        lines.append(f"  {leaf.key} ({type_name}, default {default!r}): {leaf.doc}".rstrip(": "))
    return lines


def unknown_setting(key: str, cls: type, prog: str | None = None) -> SlmError:
    """An error naming the closest settings: by spelling, and by name in any section (a flat
    `group_size=64` finds `quant.group_size`)."""
    paths = setting_paths(cls)
    names = {p.rsplit(".", 1)[-1] for p in paths}
    near_names = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=3, cutoff=0.7)
    by_name = [p for name in near_names for p in paths if p.rsplit(".", 1)[-1] == name]
    suggestions = list(dict.fromkeys(by_name + difflib.get_close_matches(key, paths, n=3, cutoff=0.8)))[:4]
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return SlmError(f"unknown setting '{key}'.{hint} (`{prog or 'slm VERB'} --help` lists them all)")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", root: type | None = None,
              prog: str | None = None) -> T:
    """Build dataclass `cls` from `data`, recursing into nested sections. An unknown key is an error
    naming the closest settings of the whole tree (`root`), and a value outside a field's
    `choices` (its metadata) is refused -- whichever way the data came (flags, YAML, key=value)."""
    if not isinstance(data, dict):
        raise SlmError(f"config {where or ''}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise unknown_setting(path, root or cls, prog)
        value = _coerce(hints[key], value, path, root or cls, prog)
        _check_choices(fields[key], value, path)
        kwargs[key] = value
    return cls(**kwargs)


def _check_choices(f: dataclasses.Field, value: Any, where: str) -> None:
    choices = f.metadata.get("choices")
    if choices is None or value is None:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in choices:
            raise SlmError(f"config '{where}': {item!r} is not one of {', '.join(map(str, choices))}")


def _coerce(hint: Any, value: Any, where: str, root: type, prog: str | None) -> Any:
    """Check `value` against a type hint, converting ints to floats and dicts to dataclasses."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where, root, prog)
            except SlmError as err:
                errors.append(err)
        if len(errors) == 1:  # `T | None`: T's own error says more
            raise errors[0]
        raise SlmError(f"config '{where}': {value!r} is not a valid {_hint_name(hint)}")
    if value is None and (hint is str or origin is list):  # `key=` clears a text or a list setting
        return "" if hint is str else []
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, root, prog)
    if origin in (list, tuple):  # YAML has no tuples, so a list is read into a tuple[T, ...]
        if not isinstance(value, (list, tuple)):
            raise SlmError(f"config '{where}': expected a list, got {value!r}")
        item = (typing.get_args(hint) or (Any,))[0]
        items = [_coerce(item, v, f"{where}[{i}]", root, prog) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SlmError(f"config '{where}': expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool):
        raise SlmError(f"config '{where}': expected an integer, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise SlmError(f"config '{where}': expected {hint.__name__}, got {value!r}")
    return value


def _hint_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a dataclass config (what YAML and JSON writers want)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML (`3`, `1e-3`, `[1,2]`);
    `key=` (nothing after the sign) sets None: the setting's "not given"."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SlmError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SlmError(f"override '{item}': '{part}' is not a section")
        node[leaf] = parse_yaml(raw, f"the value of '{key}'") if raw != "" else None
    return data


def parse_yaml(text: str, what: str) -> Any:
    """YAML text, or a one-line error naming `what` and the first problem."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:  # where and what: "line 2, column 4: expected ',' or '}', but got ':'"
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SlmError(f"{what} is not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SlmError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML settings file (empty file: no settings); the one YAML reader."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"config file '{path}' not found")
    data = parse_yaml(path.read_text(), f"'{path}'") or {}
    if not isinstance(data, dict):
        raise SlmError(f"config file '{path}' holds a {type(data).__name__}, not a mapping of settings")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """`cls` from an optional YAML file plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (`x: int = 1` then `\"\"\"doc\"\"\"`),
    or the comment on the field's line (`x: int = 1  # doc`); a subclass inherits its bases' docs."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return {**docs, **_own_field_docs(cls)}


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
        elif "  # " in lines[node.lineno - 1]:  # a field documented by the comment on its line
            docs[node.target.id] = lines[node.lineno - 1].split("  # ", 1)[1].strip()
    return docs


# --------------------------------------------------------------------------------------------
# The model architecture
# --------------------------------------------------------------------------------------------

def rope_type(scaling: dict | None) -> str:
    """The kind of a `rope_scaling` dict (HF writes it as rope_type, older files as type)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


PerLayer = int | list[int]
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # rope_scaling kinds (slmkit.rope computes them)
NORM_TYPES = ("rms", "rms_offset", "layer")
BLOCK_LAYOUTS = ("pre", "sandwich", "post", "parallel")
QK_NORMS = ("head", "projection")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer; field names follow Hugging Face `config.json`.

    Three fields may be per-block lists instead of one number (OpenELM's layer-wise scaling):
    `num_attention_heads`, `num_key_value_heads` and `intermediate_size`.
    """

    vocab_size: int = 49152  # embedding rows (tokens the model knows)
    hidden_size: int = 576  # width of the residual stream
    intermediate_size: PerLayer = 1536  # MLP width (per block: a list)
    num_hidden_layers: int = 30  # blocks applied in order
    num_attention_heads: PerLayer = 9  # query heads (per block: a list)
    num_key_value_heads: PerLayer | None = None  # None: as many as query heads (MHA); 1 is MQA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # the MLP activation: silu, gelu, gelu_pytorch_tanh, gelu_new
    max_position_embeddings: int = 2048  # the longest sequence (prompt and answer)
    rms_norm_eps: float = 1e-5  # the epsilon of every norm (Phi-2's LayerNorm too)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"longrope", "factor": ..., ...}
    tie_word_embeddings: bool = True  # the output head is the embedding matrix
    attention_bias: bool = False  # bias on q, k, v (and o unless attention_out_bias says otherwise)
    attention_out_bias: bool | None = None  # None: same as attention_bias; Qwen2 has False
    mlp_bias: bool = False  # bias on the MLP linears
    lm_head_bias: bool = False  # Phi-2
    attention_dropout: float = 0.0  # on the attention weights while training
    hidden_dropout: float = 0.0  # on embeddings and on each residual branch
    sliding_window: int | None = None  # a query sees itself and the window-1 tokens before it
    # (Gemma 2/3, Qwen2's max_window_layers; None: every layer slides when sliding_window is set, as Mistral)
    layer_types: list[str] | None = None  # per layer: full_attention or sliding_attention
    rope_local_base_freq: float | None = None  # Gemma 3: the RoPE base of the sliding layers
    no_rope_layers: list[int] | None = None  # SmolLM3: 1 = the layer uses RoPE, 0 = it has none (NoPE)
    partial_rotary_factor: float = 1.0  # share of each head's dims that RoPE rotates (Phi-2, Phi-4-mini)
    # The variations of the families slmkit reads (model.py says where each acts and who uses it).
    norm_type: str = "rms"  # rms | rms_offset (Gemma: 1 + w) | layer (Phi-2: LayerNorm with bias)
    block_layout: str = "pre"  # pre | sandwich (Gemma 2/3) | post (OLMo-2) | parallel (Phi-2)
    qk_norm: str | None = None  # None | head (Qwen3, Gemma 3) | projection (OLMo-2)
    gated_mlp: bool = True  # down(act(gate x) * up x); False: down(act(up x)) (Phi-2)
    embedding_multiplier: float = 1.0  # embeddings times this: Gemma sqrt(hidden), Granite's own
    residual_multiplier: float = 1.0  # each residual branch times this (Granite)
    # (Granite's own; Gemma 2/3's query_pre_attn_scalar^-0.5)
    attention_multiplier: float | None = None  # the attention score scale; None: 1/sqrt(head_dim)
    logits_scaling: float = 1.0  # logits divided by this (Granite)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the logits
    num_local_experts: int = 0  # 0: dense MLP; >0: Mixtral-style routed experts
    num_experts_per_tok: int = 2  # experts each token is routed to
    block_repeats: int = 1  # each stored block is applied this many times in a row (weight sharing)
    initializer_range: float = 0.02  # std of the random initial weights
    bos_token_id: int | None = 1  # beginning-of-sequence token
    eos_token_id: int | list[int] | None = 2  # end-of-sequence token(s)
    model_type: str = "llama"  # the family (HF model_type): which class and GGUF arch it is written as
    name: str = ""  # a display name
    quantization: dict | None = None  # set on quantized checkpoints: {"method", "bits", "group_size", ...}
    pruning: dict | None = None  # set on pruned checkpoints: {"method", "sparsity", "pattern", ...}
    lowrank: dict | None = None  # set on factorized checkpoints: {"method", "ranks": {linear name: rank}, ...}

    def __post_init__(self) -> None:
        if self.num_hidden_layers % self.block_repeats:
            raise SlmError(
                f"num_hidden_layers={self.num_hidden_layers} is not a multiple of "
                f"block_repeats={self.block_repeats}"
            )
        for i in range(self.num_blocks):
            heads, kv = self.heads(i), self.kv_heads(i)
            if heads % kv:
                raise SlmError(f"block {i}: {heads} attention heads do not split into {kv} key/value groups")
        if self.head_dim is None and self.hidden_size % self.heads(0):
            raise SlmError(f"hidden_size={self.hidden_size} is not divisible by {self.heads(0)} heads; set head_dim")
        if self.num_local_experts and self.num_experts_per_tok > self.num_local_experts:
            raise SlmError("num_experts_per_tok is larger than num_local_experts")
        self._check_switches()

    def _check_switches(self) -> None:
        for name, value, allowed in (("norm_type", self.norm_type, NORM_TYPES),
                                     ("block_layout", self.block_layout, BLOCK_LAYOUTS),
                                     ("qk_norm", self.qk_norm, (None, *QK_NORMS))):
            if value not in allowed:
                raise unknown_choice(name, str(value), [a for a in allowed if a])
        for name in ("layer_types", "no_rope_layers"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.num_hidden_layers or self.block_repeats != 1:
                raise SlmError(f"{name} has {len(values)} entries for {self.num_hidden_layers} layers "
                               f"(one per layer, without block sharing)")
        bad = sorted(set(self.layer_types or []) - set(LAYER_TYPES))
        if bad:
            raise SlmError(f"layer_types holds {bad}; slmkit runs {', '.join(LAYER_TYPES)}")
        if self.layer_types and "sliding_attention" in self.layer_types and not self.sliding_window:
            raise SlmError("layer_types has sliding_attention layers but sliding_window is not set")
        if rope_type(self.rope_scaling) not in ROPE_TYPES:
            raise SlmError(f"rope_scaling type '{rope_type(self.rope_scaling)}' is not supported "
                           f"(supported: {', '.join(ROPE_TYPES)})")
        if not 0 < self.partial_rotary_factor <= 1 or int(self.resolved_head_dim * self.partial_rotary_factor) % 2:
            raise SlmError(f"partial_rotary_factor {self.partial_rotary_factor} must give an even number of "
                           f"rotary dims of the head's {self.resolved_head_dim}")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return self.sliding_window is not None

    def rope_kind(self, layer: int) -> str | None:
        """The RoPE table `layer` uses: "global", "local" (Gemma 3's sliding layers) or None (NoPE)."""
        if self.no_rope_layers is not None and not self.no_rope_layers[layer]:
            return None
        if self.rope_local_base_freq is not None and self.is_sliding(layer):
            return "local"
        return "global"

    @property
    def num_blocks(self) -> int:
        """Distinct blocks with their own weights (layers / block_repeats)."""
        return self.num_hidden_layers // self.block_repeats

    def _per_block(self, value: PerLayer, block: int, name: str) -> int:
        if isinstance(value, int):
            return value
        if len(value) != self.num_blocks:
            raise SlmError(f"{name} has {len(value)} entries but the model has {self.num_blocks} blocks")
        return value[block]

    def heads(self, block: int) -> int:
        return self._per_block(self.num_attention_heads, block, "num_attention_heads")

    def kv_heads(self, block: int) -> int:
        if self.num_key_value_heads is None:
            return self.heads(block)
        return self._per_block(self.num_key_value_heads, block, "num_key_value_heads")

    def ffn_size(self, block: int) -> int:
        return self._per_block(self.intermediate_size, block, "intermediate_size")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.heads(0)

    @property
    def is_uniform(self) -> bool:
        """True when every block has the same shape and none is shared: a plain HF Llama layout."""
        lists = (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)
        return self.block_repeats == 1 and not any(isinstance(v, list) for v in lists)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


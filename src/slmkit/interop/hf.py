"""Hugging Face directories: `config.json` + safetensors weights + tokenizer files.

Our parameter names are HF's, so most weights need no renaming; the work here is mapping
`config.json` onto `ModelConfig` and back -- the keys every family shares here, the rest through
the family's row in `slmkit.interop.families` -- and, for the families whose files name or fuse
linears differently (Phi-2's `dense`/`fc1`/`fc2`, Phi-3's `qkv_proj`/`gate_up_proj`), renaming and
splitting at load, renaming and joining at save. Models no HF class expresses (per-layer widths,
shared blocks, factorized linears) are written with model_type `slmkit` and our own field names,
which only slmkit reads.

Weights are read one tensor at a time with `safetensors.safe_open` (no pickle, mmapped).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slmkit.compress.quant.qlinear import quantized_modules
from slmkit.config import ModelConfig, from_dict, rope_type, to_dict
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write, partial_dir, replace_dir, write_json
from slmkit.interop.families import Family, export_family, hf_family
from slmkit.tokenizer import Tokenizer

# Our quantized checkpoints' section. Not `quantization_config`: transformers would take that for
# one of its own quantizers and fail to load the directory less clearly.
QUANT_KEY = "slmkit_quantization"
# ModelConfig field -> config.json key of each section slmkit adds (transformers ignores them).
SECTIONS = {"quantization": QUANT_KEY, "pruning": "slmkit_pruning", "lowrank": "slmkit_lowrank"}
# config.json keys that mean the same in ModelConfig.
SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "attention_bias", "mlp_bias", "attention_dropout", "initializer_range",
               "bos_token_id", "eos_token_id", "num_local_experts", "num_experts_per_tok")
EXPERT_KEYS = ("num_local_experts", "num_experts_per_tok")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------


def config_from_hf(data: dict) -> ModelConfig:
    kind = data.get("model_type")
    if kind == "slmkit":
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        values = {k: v for k, v in data.items() if k in fields}
        values.update({name: data.get(key) for name, key in SECTIONS.items()})
        values["model_type"] = data.get("slmkit_family", "llama")  # the family it came from (its switches say the rest)
        return from_dict(ModelConfig, values)
    family = hf_family(kind)
    _refuse_fields(family, data)
    values = {k: data[k] for k in SHARED_KEYS if data.get(k) is not None}
    values.setdefault("tie_word_embeddings", family.tie_default)
    values.update(rope_values(data, family.default_theta))
    if data.get("layer_types"):
        values["layer_types"] = list(data["layer_types"])
    if family.read:
        family.read(data, values)
    values.update({k: v for k, v in family.fixed.items() if not callable(v)})
    values.update(model_type=kind, name=data.get("_name_or_path", ""))
    values.update({name: data.get(key) for name, key in SECTIONS.items()})
    config = from_dict(ModelConfig, values)
    derived = {k: v(config) for k, v in family.fixed.items() if callable(v)}  # e.g. Gemma's sqrt(hidden)
    return config.replace(**derived) if derived else config


def _refuse_fields(family: Family, data: dict) -> None:
    for key, allowed in family.refused.items():
        if data.get(key) not in allowed:
            raise SlmError(f"config.json sets {key}={data.get(key)!r}, which slmkit does not implement for "
                           f"{family.model_type} (it runs {allowed[-1]!r})")


def rope_values(data: dict, default_theta: float) -> dict:
    """RoPE settings from config.json: transformers 5's `rope_parameters` (flat, or by layer type for
    Gemma 3) or the older `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
    params = dict(data.get("rope_parameters") or {})
    out = {}
    if "full_attention" in params or "sliding_attention" in params:  # Gemma 3: a table per layer type
        local = params.get("sliding_attention") or {}
        params = dict(params.get("full_attention") or {})
        if rope_type(local) != "default":
            raise SlmError(f"rope_parameters.sliding_attention has rope_type '{rope_type(local)}'; slmkit gives "
                           "sliding layers plain RoPE")
        if "rope_theta" in local:
            out["rope_local_base_freq"] = float(local["rope_theta"])
    if data.get("rope_local_base_freq") is not None:
        out["rope_local_base_freq"] = float(data["rope_local_base_freq"])
    out["rope_theta"] = float(data.get("rope_theta", params.get("rope_theta", default_theta)))
    scaling = data.get("rope_scaling") or (params if rope_type(params) != "default" else None)
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = rope_type(data.get("rope_scaling") or params)
        if scaling["rope_type"] in ("llama3", "yarn", "longrope"):  # transformers' default for the original context
            scaling.setdefault("original_max_position_embeddings", data.get("max_position_embeddings"))
        out["rope_scaling"] = scaling
    partial = data.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if partial is not None:
        out["partial_rotary_factor"] = float(partial)
    return out


def hf_model_type(c: ModelConfig) -> str:
    """The HF model_type that expresses `c` exactly, or 'slmkit' when none does."""
    family = export_family(c)
    return family.model_type if family else "slmkit"


def config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    data = _config_to_hf(c, dtype)
    for name, key in SECTIONS.items():
        data.pop(name, None)
        if getattr(c, name):
            data[key] = getattr(c, name)
    return data


def _config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    family = export_family(c)
    dtype_name = str(dtype).removeprefix("torch.")
    if family is None:
        return {"architectures": ["SlmkitForCausalLM"], **to_dict(c), "model_type": "slmkit",
                "slmkit_family": c.model_type, "torch_dtype": dtype_name}
    data = {"architectures": [family.hf_class], "model_type": family.model_type}
    data.update({k: getattr(c, k) for k in SHARED_KEYS})
    data.update(head_dim=c.resolved_head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                torch_dtype=dtype_name, use_cache=True,
                pad_token_id=None)  # a class default may lie outside our vocabulary
    if c.partial_rotary_factor != 1.0:
        data["partial_rotary_factor"] = c.partial_rotary_factor
    if not c.num_local_experts:
        for key in EXPERT_KEYS:
            data.pop(key)
    if family.write:
        family.write(c, data)
    return data


# ---------------------------------------------------------------------------------------------
# Checkpoint names: the family's <-> ours
# ---------------------------------------------------------------------------------------------


def rename(name: str, table: dict[str, str]) -> str:
    """`name` (a module path, or a parameter's) with the first path in `table` found in it, as whole
    path segments, replaced."""
    for old, new in table.items():
        renamed, count = re.subn(rf"(^|\.){re.escape(old)}(\.|$)", rf"\g<1>{new}\g<2>", name, count=1)
        if count:
            return renamed
    return name


def fused_sizes(c: ModelConfig, fused: str) -> list[int]:
    """Rows of each part of a fused linear: [q, k, v] or [gate, up]."""
    if fused.endswith("qkv_proj"):
        d = c.resolved_head_dim
        return [c.heads(0) * d, c.kv_heads(0) * d, c.kv_heads(0) * d]
    return [c.ffn_size(0)] * 2


def from_family_names(family: Family, c: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]):
    """(name, tensor) in the family's checkpoint names -> ours, fused linears split into their parts."""
    back = {theirs: ours for ours, theirs in family.renames.items()}
    for name, tensor in tensors:
        name = rename(name, back)
        fused = next((f for f in family.fused if f".{f}." in name), None)
        if fused is None:
            yield name, tensor
            continue
        for part, piece in zip(family.fused[fused], tensor.split(fused_sizes(c, fused))):
            yield name.replace(f".{fused}.", f".{part}."), piece


def to_family_names(family: Family | None, c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the family's checkpoint names; float parts of a fused linear joined (a
    quantized model keeps its parts: its codes cannot be stacked, and only slmkit reads them)."""
    if family is None:
        return state
    state = dict(state)
    for fused, parts in family.fused.items():
        for key in [k for k in state if f".{parts[0]}." in k]:
            names = [key.replace(f".{parts[0]}.", f".{p}.") for p in parts]
            if key.endswith((".weight", ".bias")) and all(n in state for n in names):
                state[key.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat([state.pop(n) for n in names])
    return {rename(k, family.renames): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


def read_hf_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise SlmError(f"'{path}' has no config.json, so it is not a Hugging Face model directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SlmError(f"'{file}' is not valid JSON: {err}") from err
    return config_from_hf(data)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise SlmError(f"'{path}' holds pickle weights (.bin/.pt); slmkit loads only safetensors. "
                       "Convert them with transformers (`save_pretrained(safe_serialization=True)`).")
    raise SlmError(f"'{path}' has no model.safetensors")


def read_hf_tensors(path: Path, dtype: torch.dtype, config: ModelConfig | None = None):
    """Yield (name, tensor) from the directory's safetensors files, one tensor at a time, under our
    names (renamed and split from the family's when `config` is given)."""
    raw = _read_raw_tensors(path, dtype)
    family = export_family(config) if config is not None else None
    if family is None:  # written as model_type slmkit: our own names
        return raw
    return from_family_names(family, config, raw)


def _read_raw_tensors(path: Path, dtype: torch.dtype):
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a legacy buffer, recomputed by the model
                    continue
                tensor = f.get_tensor(name)
                # quantized codes stay integers; their scales are converted by the modules themselves
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def save_hf(model, tokenizer: Tokenizer | None, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    dtype = dtype or next(model.parameters()).dtype
    quantized = tuple(f"{name}." for name, _ in quantized_modules(model))
    state = {k: (v.detach() if k.startswith(quantized) or not v.is_floating_point() else v.detach().to(dtype))
             .contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    state = {k: _compact(k, v, quantized) for k, v in state.items()}
    state = to_family_names(export_family(config), config, state)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    hf_config = config_to_hf(config, dtype)
    if tokenizer is not None and "pad_token_id" in hf_config and (tokenizer.pad_token_id or 0) < config.vocab_size:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    write_json(path / "config.json", hf_config)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:
        tokenizer.save(path)
        gen["pad_token_id"] = tokenizer.pad_token_id
    write_json(path / "generation_config.json", gen)
    return path




def _compact(key: str, value: torch.Tensor, quantized: tuple[str, ...]) -> torch.Tensor:
    """A quantized layer's fp32 scales stored in fp16 when that loses nothing (int4 groups' scales
    are fp16 values: `compress.quant.rtn.int4_grid`); loading reads them back as fp32."""
    if key.endswith(".scales") and key.startswith(quantized) and value.dtype == torch.float32:
        half = value.half()
        if torch.equal(half.float(), value):
            return half
    return value


def save_checkpoint(model, tokenizer: Tokenizer | None, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """`save_hf` written whole into PATH.partial and then renamed, so an interrupted run never
    leaves a half-written checkpoint under the target name (an older one is replaced only at the end)."""
    path = Path(path)
    partial = partial_dir(path)
    save_hf(model, tokenizer, partial, dtype)
    return replace_dir(partial, path)

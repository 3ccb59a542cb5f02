"""Adapter directories in PEFT's format, so transformers + peft load ours and we load theirs.

Module names are those of the base's family in transformers (Phi-2's `dense`/`fc1`/`fc2`), and
for families whose files fuse linears (Phi-3's `qkv_proj`, `gate_up_proj`) the adapters of the
parts are written as one adapter of the fused linear: A stacked, B block-diagonal, rank the sum.
PEFT's own adapters of a fused linear come back as one adapter per part sharing A (B split by
rows); ours come back exactly as they were saved (`slmkit_adapter.json` records the parts).

    adapter_config.json         PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules,
                                base_model_name_or_path, use_rslora, use_dora, lora_dropout, ...
    adapter_model.safetensors   PEFT's keys: base_model.model.<linear>.lora_A.weight (r, in),
                                .lora_B.weight (out, r), .lora_magnitude_vector (out,) for DoRA
    slmkit_adapter.json         ours, beside PEFT's files (which it ignores): the base's shape facts,
                                checked before attaching, and its quantization for QLoRA bases
    tokenizer.json ...          the base's tokenizer, so the directory serves text by itself

Every file is written through a temporary name and renamed, adapter weights last but one and the
config last, so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.adapters.lora import LINEAR_KINDS, LoRALinear, adapted_blocks, base_weight, lora_layers, scaling
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write, write_json
from slmkit.interop.families import Family, export_family
from slmkit.interop.hf import rename
from slmkit.layers import swap_linears

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
OURS = "slmkit_adapter.json"
PREFIX = "base_model.model."
BASE_FACTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# PEFT features our LoRALinear does not compute: an adapter that uses one is refused, never half-applied.
UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "use_qalora": False, "layer_replication": None,
               "trainable_token_indices": None}


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | Path, base: str, tokenizer=None) -> Path:
    """Write `model`'s adapters as a PEFT directory whose base is `base` (a MODEL argument)."""
    layers = lora_layers(model)
    if not layers:
        raise SlmError("the model has no LoRA/DoRA layers to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(path)
    adapters, fused = family_adapters(model, layers)
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = a.B.contiguous()
        if a.m is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = a.m.contiguous()
    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(path / OURS, _our_facts(model, base, fused))
    write_json(path / CONFIG, peft_config(adapters, layers[0][1], base, len(model.model.layers)))
    return path


@dataclass
class Adapter:
    """One adapter as a file holds it: A (r, in), B (out, r), DoRA's magnitude (out,) or None."""

    A: torch.Tensor
    B: torch.Tensor
    m: torch.Tensor | None
    alpha: float

    @property
    def r(self) -> int:
        return self.A.shape[0]


def family_adapters(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> tuple[dict[str, Adapter], dict]:
    """The adapters under the family's module names, fused linears' parts joined; and the parts of
    each joined one ({fused name: [[our name, r, alpha], ...]}) so that loading can split them exactly."""
    family = export_family(model.config)
    ours = {name: Adapter(layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float(),
                          None if not layer.dora else layer.lora_magnitude_vector.detach().float(), layer.alpha)
            for name, layer in layers}
    if family is None:
        return ours, {}
    out, fused = {}, {}
    for name, adapter in ours.items():
        group = _fused_group(family, name)
        if group is None:
            out[rename(name, family.renames)] = adapter
        elif group[0] not in out:
            fused_name, parts = group
            out[fused_name], fused[fused_name] = _join(model, parts, ours, dict(layers))
    return out, fused


def _fused_group(family: Family, name: str) -> tuple[str, list[str]] | None:
    """(the fused linear's name, its parts' names) when `name` is part of one in the family's files."""
    for fused, parts in family.fused.items():
        for part in parts:
            if name.endswith("." + part):
                prefix = name[: -len(part)]
                return prefix + fused, [prefix + p for p in parts]
    return None


def _join(model: nn.Module, parts: list[str], ours: dict[str, Adapter], layers: dict[str, LoRALinear]):
    """One adapter of the fused linear: A stacked, B block-diagonal, each part's scaling kept by
    choosing the fused alpha so its scaling equals the first part's (B is rescaled only when the
    parts' scalings differ)."""
    present = [p for p in parts if p in ours]
    first = layers[present[0]]
    r = sum(ours[p].r for p in present)
    alpha = first.scaling * (math.sqrt(r) if first.rslora else r)
    rows = [model.get_submodule(p).out_features for p in parts]
    a = torch.cat([ours[p].A for p in present])
    b = torch.zeros(sum(rows), r)
    m = [] if any(ours[p].m is not None for p in present) else None
    row = col = 0
    for part, height in zip(parts, rows):
        if part in ours:
            adapter = ours[part]
            b[row:row + height, col:col + adapter.r] = adapter.B * (layers[part].scaling / first.scaling)
            col += adapter.r
        if m is not None:
            m.append(ours[part].m if part in ours and ours[part].m is not None else  # an unadapted part: g = 1
                     torch.linalg.norm(base_weight(model.get_submodule(part)).detach().float(), dim=1))
        row += height
    joined = Adapter(a, b, None if m is None else torch.cat(m), alpha)
    return joined, [[p, ours[p].r, ours[p].alpha] for p in present]


def peft_config(adapters: dict[str, Adapter], first: LoRALinear, base: str, n_blocks: int) -> dict:
    """PEFT's adapter_config.json; per-layer ranks or alphas that differ go into its patterns."""
    r, alpha = next(iter(adapters.values())).r, next(iter(adapters.values())).alpha
    leaves = sorted({name.rpartition(".")[2] for name in adapters})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": _dropout(first), "use_rslora": first.rslora,
        "use_dora": first.dora, "target_modules": leaves, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        **_layers(adapters, n_blocks),
        "rank_pattern": {name: a.r for name, a in adapters.items() if a.r != r},
        "alpha_pattern": {name: a.alpha for name, a in adapters.items() if a.alpha != alpha},
    }


def _layers(adapters: dict[str, Adapter], n_blocks: int) -> dict:
    """PEFT's layers_to_transform when only some blocks are adapted (lora.layers), else none."""
    blocks = adapted_blocks(list(adapters))
    partial = bool(blocks) and len(blocks) < n_blocks
    return {"layers_to_transform": blocks if partial else None, "layers_pattern": "layers" if partial else None}


def _dropout(layer: LoRALinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _our_facts(model: nn.Module, base: str, fused: dict) -> dict:
    c = model.config
    return {"format": 1, "base": base, "base_config": {k: getattr(c, k) for k in BASE_FACTS},
            "quantization": c.quantization, "fused": fused}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class AdapterFiles:
    path: Path
    config: dict  # adapter_config.json
    facts: dict  # slmkit_adapter.json ({} for an adapter PEFT wrote)

    @property
    def base(self) -> str | None:
        return self.facts.get("base") or self.config.get("base_model_name_or_path")

    @property
    def bytes(self) -> int:
        return (self.path / WEIGHTS).stat().st_size


def read_adapter(path: str | Path) -> AdapterFiles:
    """The adapter's configs, checked for what slmkit can apply (one-line errors otherwise)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
        facts = json.loads((path / OURS).read_text()) if (path / OURS).is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise SlmError(f"'{path}' holds an unreadable adapter config: {err}") from err
    if config.get("peft_type") != "LORA":
        raise SlmError(f"'{path}' is a {config.get('peft_type')} adapter; slmkit applies LORA adapters (incl. DoRA)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise SlmError(f"'{path}' trains biases or whole modules (bias/modules_to_save); slmkit applies only "
                       "the low-rank updates")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, False, None, []):
            raise SlmError(f"'{path}' uses PEFT's {key}, which slmkit does not apply")
    if not (path / WEIGHTS).is_file():
        other = "adapter_model.bin (pickle, refused)" if (path / "adapter_model.bin").is_file() else "nothing"
        raise SlmError(f"'{path}' has no {WEIGHTS} (found {other}); save it with safetensors")
    return AdapterFiles(path, config, facts)


def attach_adapter(model: nn.Module, adapter: AdapterFiles) -> list[str]:
    """Wrap the linears the adapter names in LoRA/DoRA layers holding its weights; returns their names.
    Every check (base facts, module names, shapes) runs before the model is changed."""
    check_base(model, adapter)
    made = {name: _layer(model, name, parts, adapter) for name, parts in read_layers(model, adapter).items()}
    swap_linears(model, lambda name, _layer: made.get(name), LINEAR_KINDS)
    model.requires_grad_(False)
    return list(made)


def read_layers(model: nn.Module, adapter: AdapterFiles) -> dict[str, dict]:
    """{our linear name: {"A", "B", "m", "alpha"}} from the file: the family's names renamed back,
    fused linears split into their parts."""
    family = export_family(model.config)
    c = adapter.config
    out = {}
    for name, parts in _group(load_file(str(adapter.path / WEIGHTS)), adapter.path).items():
        parts["alpha"] = float(_pattern(c.get("alpha_pattern"), name, c.get("lora_alpha", 8)))
        fused = _fused_parts(family, name)
        if fused is None:
            out[rename(name, {v: k for k, v in family.renames.items()}) if family else name] = parts
        else:
            out.update(_split(model, fused, parts, bool(c.get("use_rslora")),
                              (adapter.facts.get("fused") or {}).get(name)))
    return out


def _fused_parts(family: Family | None, name: str) -> list[str] | None:
    """Our names of the parts when `name` is a fused linear of the family's files."""
    for fused, parts in (family.fused if family else {}).items():
        if name.endswith("." + fused):
            prefix = name[: -len(fused)]
            return [prefix + p for p in parts]
    return None


def _split(model: nn.Module, parts: list[str], joined: dict, rslora: bool, recorded: list | None) -> dict:
    """One adapter per part of a fused linear: B and DoRA's magnitude split by the parts' rows; A
    split by the ranks slmkit recorded when it joined them, else shared (PEFT's own adapter)."""
    rows = [model.get_submodule(p).out_features for p in parts]
    b_rows = joined["B"].split(rows)
    m_rows = joined["m"].split(rows) if "m" in joined else [None] * len(parts)
    if recorded is None:
        return {p: _parts(joined["A"], b, m, joined["alpha"]) for p, b, m in zip(parts, b_rows, m_rows)}
    s_joined = scaling(joined["alpha"], joined["A"].shape[0], rslora)
    out, col = {}, 0
    for name, r, alpha in recorded:
        i = parts.index(name)
        rescale = s_joined / scaling(alpha, r, rslora)  # 1 unless the parts were saved with different scalings
        out[name] = _parts(joined["A"][col:col + r], b_rows[i][:, col:col + r] * rescale, m_rows[i], alpha)
        col += r
    return out


def _parts(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None, alpha: float) -> dict:
    parts = {"A": a.contiguous(), "B": b.contiguous(), "alpha": alpha}
    if m is not None:
        parts["m"] = m.contiguous()
    return parts


def check_base(model: nn.Module, adapter: AdapterFiles) -> None:
    expected = adapter.facts.get("base_config") or {}
    c = model.config
    differ = [f"{k} {expected[k]} (this model: {getattr(c, k)})" for k in BASE_FACTS
              if k in expected and expected[k] != getattr(c, k)]
    if differ:
        raise SlmError(f"the adapter '{adapter.path}' was trained on another base: {', '.join(differ)}; "
                       f"load it over its own base ({adapter.base})")


def _group(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {"A", "B", "m"}} from PEFT's keys."""
    parts = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, part in parts.items():
            if name.endswith("." + suffix):
                groups.setdefault(name[: -len(suffix) - 1], {})[part] = tensor
                break
        else:
            raise SlmError(f"'{path / WEIGHTS}' holds '{key}', which is not a LoRA/DoRA tensor slmkit applies")
    for name, group in groups.items():
        if "A" not in group or "B" not in group:
            raise SlmError(f"'{path / WEIGHTS}' has only half of the adapter of '{name}' (lora_A and lora_B needed)")
    return groups


def _layer(model: nn.Module, name: str, parts: dict, adapter: AdapterFiles) -> LoRALinear:
    try:
        base = model.get_submodule(name)
    except AttributeError:
        base = None
    if not isinstance(base, LINEAR_KINDS):
        raise SlmError(f"the adapter '{adapter.path}' adapts '{name}', which is not a linear of this model; "
                       f"load it over its own base ({adapter.base})")
    a, b = parts["A"], parts["B"]
    r = a.shape[0]
    if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
        raise SlmError(f"the adapter of '{name}' has shapes A {tuple(a.shape)}, B {tuple(b.shape)} but the layer is "
                       f"{base.out_features}x{base.in_features}: the adapter belongs to another base ({adapter.base})")
    layer = LoRALinear(base, r, parts["alpha"], 0.0, bool(adapter.config.get("use_rslora")), dora="m" in parts)
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        if "m" in parts:
            layer.lora_magnitude_vector.copy_(parts["m"])
    return layer


def _pattern(patterns: dict | None, name: str, default):
    """PEFT's per-module override: the first pattern key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def restore_adapter(model: nn.Module, path: Path) -> None:
    """Copy a saved adapter's weights back into the same model's adapters (resuming a run)."""
    saved = read_layers(model, read_adapter(path))
    own = dict(lora_layers(model))
    if set(saved) != set(own):
        raise RuntimeError(f"the adapter in {path} does not match this run's adapters "
                           f"({len(saved)} layers saved, {len(own)} expected)")
    with torch.no_grad():
        for name, layer in own.items():
            tensors = [(layer.lora_A.weight, saved[name]["A"]), (layer.lora_B.weight, saved[name]["B"])]
            if layer.dora:
                tensors.append((layer.lora_magnitude_vector, saved[name]["m"]))
            for tensor, value in tensors:
                if tensor.shape != value.shape:
                    raise RuntimeError(f"{name} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
                tensor.copy_(value)

"""Adapter directories in PEFT's format, so transformers + peft load ours and we load theirs.

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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmkit.adapters.lora import LINEAR_KINDS, LoRALinear, adapter_tensors, lora_layers
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write, write_json
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
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise SlmError("the model has no LoRA/DoRA layers to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(path)
    tensors = {PREFIX + k: v.detach().float().contiguous() for k, v in adapter_tensors(model).items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(path / OURS, _our_facts(model, base))
    write_json(path / CONFIG, peft_config(layers, base))
    return path


def peft_config(layers: list[tuple[str, LoRALinear]], base: str) -> dict:
    """PEFT's adapter_config.json; per-layer ranks or alphas that differ go into its patterns."""
    first = layers[0][1]
    leaves = sorted({name.rpartition(".")[2] for name, _ in layers})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": _dropout(first), "use_rslora": first.rslora,
        "use_dora": first.dora, "target_modules": leaves, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {name: m.r for name, m in layers if m.r != first.r},
        "alpha_pattern": {name: m.alpha for name, m in layers if m.alpha != first.alpha},
    }


def _dropout(layer: LoRALinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _our_facts(model: nn.Module, base: str) -> dict:
    c = model.config
    return {"format": 1, "base": base, "base_config": {k: getattr(c, k) for k in BASE_FACTS},
            "quantization": c.quantization}


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
    from safetensors.torch import load_file

    check_base(model, adapter)
    groups = _group(load_file(str(adapter.path / WEIGHTS)), adapter.path)
    made = {name: _layer(model, name, parts, adapter) for name, parts in groups.items()}
    swap_linears(model, lambda name, _layer: made.get(name), LINEAR_KINDS)
    model.requires_grad_(False)
    return list(made)


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
    c = adapter.config
    layer = LoRALinear(base, r, float(_pattern(c.get("alpha_pattern"), name, c.get("lora_alpha", 8))), 0.0,
                       bool(c.get("use_rslora")), dora="m" in parts)
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
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / WEIGHTS))
    own = adapter_tensors(model)
    if set(saved) != {PREFIX + k for k in own}:
        raise RuntimeError(f"the adapter in {path} does not match this run's adapters "
                           f"({len(saved)} tensors saved, {len(own)} expected)")
    with torch.no_grad():
        for key, tensor in own.items():
            if tensor.shape != saved[PREFIX + key].shape:
                raise RuntimeError(f"{key} has shape {tuple(saved[PREFIX + key].shape)}, expected {tuple(tensor.shape)}")
            tensor.copy_(saved[PREFIX + key])

"""What slmkit knows of each model family: its config.json keys, the names and fusions of its
checkpoint tensors, and its llama.cpp architecture -- one module per family group (llama, qwen,
gemma, phi, olmo), one `Family` row per HF `model_type`, collected here.

`model.py` runs every family through the same block with switches; `Family.mismatch` (base.py)
says which switch a config has that a family cannot hold, which decides the `model_type` an
export is written as (`export_family`): the model's own family when it fits, else a Llama-family
class that does, else `slmkit`.
"""

from __future__ import annotations

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.families import gemma, llama, olmo, phi, qwen
from slmkit.interop.families.base import Family, GgufSpec, switch_value  # noqa: F401 (the package's API)

FAMILIES: dict[str, Family] = {f.model_type: f for module in (llama, qwen, gemma, phi, olmo) for f in module.FAMILIES}


def hf_family(model_type: str | None) -> Family:
    """The family of a config.json `model_type`, or a one-line error naming the supported ones."""
    if model_type not in FAMILIES:
        raise SlmError(f"model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)}, slmkit)")
    return FAMILIES[model_type]


def gguf_family(arch: str | None, experts: bool = False) -> Family:
    """The family a GGUF architecture is read as (llama with experts is Mixtral)."""
    if arch == "llama" and experts:
        return FAMILIES["mixtral"]
    for family in FAMILIES.values():
        if family.gguf is not None and family.gguf.arch == arch and family.model_type != "mixtral":
            return family
    archs = sorted({f.gguf.arch for f in FAMILIES.values() if f.gguf})
    raise SlmError(f"GGUF architecture '{arch}' is not supported (supported: {', '.join(archs)})")


# Llama-family classes a model that does not fit its own family may still be written as, in order.
FALLBACKS = ("llama", "qwen2", "mistral", "mixtral")


def export_family(c: ModelConfig) -> Family | None:
    """The family whose HF class holds `c` exactly: its own, else a Llama-family one; None when none
    does (per-layer widths, shared blocks, factorized linears, a mix no class has)."""
    if not c.is_uniform or c.lowrank:
        return None
    for name in dict.fromkeys((c.model_type, *FALLBACKS)):
        family = FAMILIES.get(name)
        if family is not None and family.mismatch(c) is None:
            return family
    return None


def family_of(c: ModelConfig) -> Family:
    """The family a model came from (Llama for slmkit's own and unknown types)."""
    return FAMILIES.get(c.model_type) or FAMILIES["llama"]

"""Hugging Face directories: `config.json` + safetensors weights + tokenizer files.

Our parameter names are HF's, so weights need no renaming; the work here is mapping `config.json`
of the Llama-family model types (llama, mistral, qwen2, mixtral) onto `ModelConfig` and back.
Models HF cannot express (per-layer widths, shared blocks) are written with model_type `slmkit`
and our own field names, which only slmkit reads.

Weights are read one tensor at a time with `safetensors.safe_open` (no pickle, mmapped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from slmkit.compress.quant.qlinear import quantized_modules
from slmkit.config import ModelConfig, from_dict, to_dict
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write, partial_dir, replace_dir, write_json
from slmkit.tokenizer import Tokenizer

HF_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
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


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------


def config_from_hf(data: dict) -> ModelConfig:
    kind = data.get("model_type")
    if kind == "slmkit":
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        values = {k: v for k, v in data.items() if k in fields}
        values.update({name: data.get(key) for name, key in SECTIONS.items()})
        return from_dict(ModelConfig, values)
    if kind not in HF_TYPES:
        raise SlmError(f"model_type '{kind}' is not supported (supported: {', '.join(HF_TYPES)}, slmkit)")
    values = {k: data[k] for k in SHARED_KEYS if data.get(k) is not None}
    values.setdefault("tie_word_embeddings", False)  # the transformers default for these families
    rope = data.get("rope_parameters") or {}  # transformers >= 5 moves rope settings here
    values["rope_theta"] = float(data.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        values["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if kind == "qwen2":
        values.update(attention_bias=True, attention_out_bias=False)
    if kind in ("mistral", "mixtral") or data.get("use_sliding_window"):
        values["sliding_window"] = data.get("sliding_window")
    if kind == "mixtral":
        values.setdefault("num_experts_per_tok", 2)
    values["model_type"] = kind
    values["name"] = data.get("_name_or_path", "")
    values.update({name: data.get(key) for name, key in SECTIONS.items()})
    return from_dict(ModelConfig, values)


def hf_model_type(c: ModelConfig) -> str:
    """The HF model_type that expresses `c` exactly, or 'slmkit' when none does."""
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    if not c.is_uniform or c.hidden_dropout or c.hidden_act != "silu" or c.lowrank:  # factorized: no HF class
        return "slmkit"
    if c.hidden_size % c.heads(0):  # transformers' LlamaConfig refuses this even with head_dim set
        return "slmkit"
    if c.num_local_experts:
        return "mixtral" if not (c.attention_bias or c.mlp_bias) else "slmkit"
    if c.attention_bias and not out_bias and not c.mlp_bias:
        return "qwen2"
    if c.attention_bias != out_bias:
        return "slmkit"
    if c.sliding_window:
        return "mistral" if not (c.attention_bias or c.mlp_bias) else "slmkit"
    return "llama"


def config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    data = _config_to_hf(c, dtype)
    for name, key in SECTIONS.items():
        data.pop(name, None)
        if getattr(c, name):
            data[key] = getattr(c, name)
    return data


def _config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    kind = hf_model_type(c)
    dtype_name = str(dtype).removeprefix("torch.")
    if kind == "slmkit":
        return {"architectures": ["SlmkitForCausalLM"], **to_dict(c), "model_type": "slmkit",
                "torch_dtype": dtype_name}
    data = {"architectures": [HF_TYPES[kind]], "model_type": kind}
    data.update({k: getattr(c, k) for k in SHARED_KEYS})
    data.update(head_dim=c.resolved_head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                torch_dtype=dtype_name, use_cache=True)
    if kind in ("mistral", "mixtral", "qwen2"):
        data["sliding_window"] = c.sliding_window
        data["use_sliding_window"] = c.sliding_window is not None
    if kind != "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            data.pop(key)
    if kind == "qwen2":
        for key in ("attention_bias", "mlp_bias"):
            data.pop(key)
    return data


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


def read_hf_tensors(path: Path, dtype: torch.dtype):
    """Yield (name, tensor) from the directory's safetensors files, one tensor at a time."""
    from safetensors import safe_open

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
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    dtype = dtype or next(model.parameters()).dtype
    quantized = tuple(f"{name}." for name, _ in quantized_modules(model))
    state = {k: (v.detach() if k.startswith(quantized) or not v.is_floating_point() else v.detach().to(dtype))
             .contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(path / "config.json", config_to_hf(config, dtype))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:
        tokenizer.save(path)
        gen["pad_token_id"] = tokenizer.pad_token_id
    write_json(path / "generation_config.json", gen)
    return path




def save_checkpoint(model, tokenizer: Tokenizer | None, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """`save_hf` written whole into PATH.partial and then renamed, so an interrupted run never
    leaves a half-written checkpoint under the target name (an older one is replaced only at the end)."""
    path = Path(path)
    partial = partial_dir(path)
    save_hf(model, tokenizer, partial, dtype)
    return replace_dir(partial, path)

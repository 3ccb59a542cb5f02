"""LoRA adapters as llama.cpp GGUF adapter files (`llama-cli -m base.gguf --lora adapter.gguf`).

What llama.cpp reads (llama-adapter.cpp): `general.type = adapter`, `general.architecture` equal
to the base's, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted tensor a pair
`blk.N.attn_q.weight.lora_a` (PyTorch (r, in)) and `.lora_b` ((out, r)), checked against the
base tensor's shape; it applies `alpha / r` with r read from lora_b, and nothing else: no DoRA
magnitudes, no rsLoRA, and no `output` tensor when the head is tied to the embedding.

So: lora_B's rows get what the base export does to the rows of its linear (the q/k permutation of
NORM-RoPE archs, Gemma 2's attention scale folded into q); each layer's own scaling (rsLoRA's
alpha / sqrt(r), PEFT's alpha/rank patterns) is folded into its lora_B against one file-wide
alpha; Phi-3's fused [gate; up] gets one block-diagonal adapter; DoRA and adapters of a tied head
are refused with the way out.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from slmkit.adapters.lora import LoRALinear, lora_layers
from slmkit.errors import SlmError
from slmkit.interop.gguf import check_exportable, gguf_name, gguf_spec, to_file, write_gguf_file


def lora_tensors(model: nn.Module) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(file-wide alpha, [(gguf name, fp32 array in PyTorch order)]) for every adapted linear."""
    layers = lora_layers(model)
    if not layers:
        raise SlmError("the model has no LoRA layers to export")
    _check_exportable_adapter(model, layers)
    config, spec = model.config, gguf_spec(model.config)
    first = layers[0][1]
    alpha = first.scaling * first.r  # llama.cpp multiplies by alpha / r
    pairs = {name: (layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float() * layer.scaling)
             for name, layer in layers}  # B carries the layer's own scaling; alpha / r is divided out below
    if spec.fused_ffn:
        pairs = _fuse_gate_up(pairs, model)
    out = []
    for name, (a, b) in pairs.items():
        b = to_file(name + ".weight", b, config, spec) / (alpha / a.shape[0])  # lora_B's rows are the linear's rows
        base = gguf_name(name + ".weight", config)
        out += [(base + ".lora_a", a.numpy()), (base + ".lora_b", b.contiguous().numpy())]
    return alpha, out


def _fuse_gate_up(pairs: dict, model: nn.Module) -> dict:
    """Phi-3's ffn_up = [gate; up]: one adapter of rank r_gate + r_up, A stacked, B block-diagonal."""
    out = {}
    for name, (a, b) in pairs.items():
        if not name.endswith(("mlp.gate_proj", "mlp.up_proj")):
            out[name] = (a, b)
            continue
        up = name.rsplit(".", 1)[0] + ".up_proj"
        blocks = out.setdefault(up, [])
        blocks.append((name.endswith("gate_proj"), a, b))
    for up, blocks in [(k, v) for k, v in out.items() if isinstance(v, list)]:
        width = model.get_submodule(up).out_features
        a = torch.cat([a for _, a, _ in sorted(blocks, key=lambda x: not x[0])])
        b = torch.zeros(2 * width, a.shape[0])
        col = 0
        for is_gate, block_a, block_b in sorted(blocks, key=lambda x: not x[0]):
            rows = slice(0, width) if is_gate else slice(width, 2 * width)
            b[rows, col:col + block_a.shape[0]] = block_b
            col += block_a.shape[0]
        out[up] = (a, b)
    return out


def _check_exportable_adapter(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    check_exportable(model.config)
    if any(layer.dora for _, layer in layers):
        raise SlmError("llama.cpp adapters have no DoRA magnitudes; merge the adapter into the base (`slm merge`) "
                       "and export the merged model (`slm export gguf`)")
    if model.config.tie_word_embeddings and any(name == "lm_head" for name, _ in layers):
        raise SlmError("the adapter changes the output head, which this model ties to its embedding: llama.cpp has no "
                       "head tensor to apply it to; merge it (`slm merge`) and export the merged model")


def write_gguf_lora(model: nn.Module, path: str | Path, name: str = "") -> Path:
    """Write `model`'s adapters (a base with LoRA layers) as a llama.cpp LoRA GGUF, atomically."""
    alpha, tensors = lora_tensors(model)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_string("general.type", "adapter")
        writer.add_name(name or "slmkit-lora")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for tensor_name, data in tensors:
            writer.add_tensor(tensor_name, data.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    return write_gguf_file(path, gguf_spec(model.config).arch, fill)


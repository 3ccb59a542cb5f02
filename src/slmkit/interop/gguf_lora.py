"""LoRA adapters as llama.cpp GGUF adapter files (`llama-cli -m base.gguf --lora adapter.gguf`).

What llama.cpp reads (llama-adapter.cpp): `general.type = adapter`, `general.architecture` equal
to the base's, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted tensor a pair
`blk.N.attn_q.weight.lora_a` (PyTorch (r, in)) and `.lora_b` ((out, r)), checked against the
base tensor's shape; it applies `alpha / r` with r read from lora_b, and nothing else: no DoRA
magnitudes, no rsLoRA, and no `output` tensor when the head is tied to the embedding.

So: q/k rows of lora_B are permuted like the base's q/k rows (ggml pairs RoPE dimensions 2i, 2i+1);
each layer's own scaling (rsLoRA's alpha / sqrt(r), PEFT's alpha/rank patterns) is folded into its
lora_B against one file-wide alpha; DoRA and adapters of a tied head are refused with the way out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from slmkit.adapters.lora import LoRALinear, lora_layers
from slmkit.errors import SlmError
from slmkit.interop.gguf import check_exportable, gguf_name, permute_qk


def lora_tensors(model: nn.Module) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(file-wide alpha, [(gguf name, fp32 array in PyTorch order)]) for every adapted linear."""
    layers = lora_layers(model)
    if not layers:
        raise SlmError("the model has no LoRA layers to export")
    _check_exportable_adapter(model, layers)
    first = layers[0][1]
    alpha = first.scaling * first.r  # llama.cpp multiplies by alpha / r
    out = []
    for name, layer in layers:
        fold = layer.scaling / (alpha / layer.r)  # 1 unless this layer's scaling differs from the first's
        a, b = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float() * fold
        if name.endswith(("q_proj", "k_proj")):
            heads = model.config.heads(0) if name.endswith("q_proj") else model.config.kv_heads(0)
            b = permute_qk(b, heads)  # lora_B's rows are output rows: ggml's RoPE order, as the base's
        base = gguf_name(name + ".weight")
        out += [(base + ".lora_a", a.numpy()), (base + ".lora_b", b.contiguous().numpy())]
    return alpha, out


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
    import gguf

    alpha, tensors = lora_tensors(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_name(name or "slmkit-lora")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(tmp, path)
    return path


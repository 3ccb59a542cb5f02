"""ONNX Runtime GenAI export: a directory `onnxruntime-genai` loads on Windows, Linux, macOS, Android
and iOS (model.onnx with its external weights, genai_config.json, the tokenizer and chat template).

Why onnxruntime-genai's own model builder and not a graph of ours: the runtime expects its fused
operators (GroupQueryAttention with the KV cache as inputs and outputs, SkipSimplifiedLayerNorm,
MatMulNBits for int4/int8 weights) and a genai_config.json that matches them; the builder writes
exactly that, per family, and is maintained with the runtime. We hand it the model as an HF
directory (adapters merged and factorized layers densified by the caller) and run it in a
subprocess, so its logging and its transformers import stay out of slmkit's process.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slmkit.errors import SlmError
from slmkit.fileio import partial_dir, replace_dir, write_json
from slmkit.interop.families import export_family
from slmkit.interop.hf import save_hf

ONNX_PRECISIONS = ("int4", "int8", "fp32")  # int4/int8: MatMulNBits weight-only quantization (block 32)
INSTALL = "pip install -e '.[onnx]'"
# The HF classes of our families that onnxruntime-genai 0.18's builder turns into a graph (its
# `create_model` dispatch); others are refused before any work.
BUILDER_CLASSES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "GraniteForCausalLM", "SmolLM3ForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "OlmoForCausalLM",
})


def onnx_missing() -> str | None:
    """One line naming the install command when the exporter's packages are missing."""
    for module in ("onnxruntime_genai", "onnx_ir", "onnx", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"ONNX export and runs need onnxruntime-genai and its model builder ({module} is missing): {INSTALL}"
    return None


def check_onnx_target(out: str | Path, force: bool) -> None:
    """What can be refused before a model is loaded: an existing OUT, a missing extra."""
    if Path(out).exists() and not force:
        raise SlmError(f"'{out}' exists; give --force to replace it")
    missing = onnx_missing()
    if missing:
        raise SlmError(missing)


def onnx_refusal(config) -> str | None:
    """Why this architecture cannot be written for ONNX Runtime GenAI, or None."""
    family = export_family(config)
    if family is None:
        return ("no Hugging Face class holds this model (per-layer widths, shared blocks or factorized linears: "
                "densify a factorized model with --densify)")
    if config.num_local_experts:
        return "mixture-of-experts models are not written by onnxruntime-genai's builder for this family"
    if family.hf_class not in BUILDER_CLASSES:
        return f"onnxruntime-genai's model builder has no graph for {family.hf_class}"
    return None


def write_onnx(model, tokenizer, out: str | Path, precision: str = "int4", force: bool = False, log=print) -> Path:
    """Write `model` (a plain model: no adapter layers, no factorized linears) as an ONNX Runtime GenAI
    directory; the directory appears whole or not at all."""
    if precision not in ONNX_PRECISIONS:
        raise SlmError(f"ONNX precision '{precision}' is unknown (choose from {', '.join(ONNX_PRECISIONS)})")
    check_onnx_target(out, force)
    refusal = onnx_refusal(model.config)
    if refusal:
        raise SlmError(f"this model cannot be written for ONNX Runtime GenAI: {refusal}")
    out = Path(out)
    if tokenizer is None:
        raise SlmError("the model has no tokenizer; onnxruntime-genai needs one beside the graph")
    partial = partial_dir(out)
    with tempfile.TemporaryDirectory(prefix="onnx-", dir=partial.parent) as work:
        source = save_hf(model, tokenizer, Path(work) / "hf", torch.float32)
        log(f"building the ONNX graph ({precision}, CPU) with onnxruntime-genai's model builder...")
        _run_builder(source, partial, precision, Path(work) / "cache")
        # our architecture beside the graph (the runtime ignores it): `slm generate/chat/bench OUT` read it
        shutil.copy(source / "config.json", partial / "config.json")
        write_json(partial / "slmkit_onnx.json", {"precision": precision, "builder": "onnxruntime-genai"})
    if not (partial / "genai_config.json").is_file() or not (partial / "model.onnx").is_file():
        raise SlmError(f"the builder finished without model.onnx and genai_config.json in {partial}")
    return replace_dir(partial, out)


def _run_builder(source: Path, out: Path, precision: str, cache: Path) -> None:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise SlmError(f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n{tail}")

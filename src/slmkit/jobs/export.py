"""`slm export gguf`, `slm export gguf-lora`, `slm export ollama`, `slm export onnx`, `slm export executorch`,
`slm export litert`, `slm convert` and `slm merge` as jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.adapters.merge import merge_adapters
from slmkit.compress.lowrank import densify
from slmkit.compress.quant.qlinear import quantized_modules
from slmkit.errors import SlmError
from slmkit.fileio import dir_bytes, write_text
from slmkit.generate import stop_token_ids
from slmkit.interop.executorch import (
    DEFAULT_MAX_SEQ_LEN,
    EXECUTORCH_PRECISIONS,
    check_executorch_target,
    write_executorch,
)
from slmkit.interop.gguf import write_gguf
from slmkit.interop.gguf_lora import write_gguf_lora
from slmkit.interop.hf import save_checkpoint, save_hf
from slmkit.interop.litert import DEFAULT_MAX_SEQ_LEN as LITERT_MAX_SEQ_LEN
from slmkit.interop.litert import LITERT_PRECISIONS, check_litert_target, write_litert
from slmkit.interop.modelfile import chat_format, modelfile
from slmkit.interop.onnx import ONNX_PRECISIONS, check_onnx_target, write_onnx
from slmkit.interop.peft import is_adapter_dir
from slmkit.interop.phone import sidecar_dir
from slmkit.jobs.compress import Log, load_whole
from slmkit.load import load
from slmkit.runtime import GGUF_TYPES, SAVE_DTYPES


@dataclass
class GgufJob:
    model: str = ""
    """the MODEL to write (an adapter directory is merged into its base first)"""
    out: str = ""
    """OUT.gguf"""
    type: str = field(default="q8_0", metadata={"choices": GGUF_TYPES})
    """tensor type: f32, f16, q8_0 (near-lossless), q4_0, q4_1 or q4_k_m (llama.cpp's popular 4-bit mix)"""
    densify: bool = False
    """a factorized model (`slm lowrank`): multiply its factors back into full matrices first (llama.cpp has no factorized linears; same outputs, the original size)"""


@dataclass
class GgufLoraJob:
    adapter: str = ""
    """adapter directory (PEFT format, e.g. runs/s2d-lora)"""
    out: str = ""
    """OUT.gguf"""
    base: str | None = None
    """the base MODEL (default: the one the adapter's config names)"""


@dataclass
class MergeJob:
    base: str = ""
    """the base MODEL the adapter was trained on"""
    adapter: str = ""
    """adapter directory (PEFT format)"""
    out: str = field(default="", metadata={"flag": ("-o", "--out")})
    """output directory"""
    dtype: str = field(default="float32", metadata={"choices": SAVE_DTYPES})
    """safetensors precision of a float base (a quantized base keeps its codes)"""


def check_gguf(job: GgufJob) -> None:
    if not job.model or not job.out:
        raise SlmError("give the MODEL to write and OUT.gguf")
    if not job.out.endswith(".gguf"):
        raise SlmError(f"'{job.out}' should end in .gguf")
    if job.type not in GGUF_TYPES:
        raise SlmError(f"GGUF type '{job.type}' is unknown (choose from {', '.join(GGUF_TYPES)})")


def run_gguf(job: GgufJob, log: Log = print) -> Path:
    check_gguf(job)
    loaded = load_whole(job.model, log)
    if loaded.tokenizer is None:
        raise SlmError(f"'{job.model}' has no tokenizer; a GGUF file needs one")
    if job.densify and loaded.model.config.lowrank:
        log(f"densified {densify(loaded.model)} factorized linears")
    out = write_gguf(loaded.model, loaded.tokenizer, job.out, job.type)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {job.type})")
    return out


@dataclass
class OllamaJob:
    model: str = ""
    """the run or MODEL to export (an adapter directory keeps its adapter separate: ADAPTER in the Modelfile)"""
    out: str = ""
    """the directory for the GGUF files and the Modelfile"""
    type: str = field(default="q8_0", metadata={"choices": GGUF_TYPES})
    """tensor type of the model GGUF (the adapter GGUF is f32)"""


def run_ollama(job: OllamaJob, log: Log = print) -> Path:
    """DIR/model.gguf (+ DIR/adapter.gguf for an adapter run) and DIR/Modelfile for `ollama create`."""
    if not job.model or not job.out:
        raise SlmError("give the run (or MODEL) and an output directory: slm export ollama RUN DIR")
    if job.type not in GGUF_TYPES:
        raise SlmError(f"GGUF type '{job.type}' is unknown (choose from {', '.join(GGUF_TYPES)})")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter_name = None
    if is_adapter_dir(Path(job.model)):
        loaded = _adapter(job.model, None)
        adapter_name = "adapter.gguf"
        write_gguf_lora(loaded.model, out / adapter_name, Path(job.model.rstrip("/")).name)
        base = load_whole(loaded.source.base, log)
        model, tokenizer = base.model, base.tokenizer or loaded.tokenizer
    else:
        loaded = load_whole(job.model, log)
        model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise SlmError(f"'{job.model}' has no tokenizer; Ollama needs one in the GGUF")
    write_gguf(model, tokenizer, out / "model.gguf", job.type)
    stops = [tokenizer.token(i) for i in stop_token_ids(model.config, tokenizer)]
    write_text(out / "Modelfile", modelfile("model.gguf", tokenizer.chat_template, stops, adapter_name, job.model))
    fmt = chat_format(tokenizer.chat_template) or "the GGUF's own (read by Ollama)"
    log(f"wrote {out}/Modelfile (chat format: {fmt}), model.gguf{' and adapter.gguf' if adapter_name else ''}; "
        f"run: ollama create NAME -f {out}/Modelfile")
    return out / "Modelfile"


@dataclass
class OnnxJob:
    model: str = ""
    """the MODEL to write (an adapter directory is merged into its base, a factorized model densified)"""
    out: str = ""
    """the output directory (model.onnx, genai_config.json, tokenizer) that onnxruntime-genai loads"""
    precision: str = field(default="int4", metadata={"choices": ONNX_PRECISIONS})
    """weights: int4 or int8 (MatMulNBits, weight-only, block 32) or fp32"""
    force: bool = False
    """replace OUT if it exists"""


def run_onnx(job: OnnxJob, log: Log = print) -> Path:
    """OUT as an ONNX Runtime GenAI directory; refused before loading anything the runtime cannot take."""
    if not job.model or not job.out:
        raise SlmError("give the MODEL to write and an output directory: slm export onnx MODEL OUT")
    check_onnx_target(job.out, job.force)  # before the model loads
    loaded = load_whole(job.model, log)
    if loaded.model.config.lowrank:
        log(f"densified {densify(loaded.model)} factorized linears")
    out = write_onnx(loaded.model, loaded.tokenizer, job.out, job.precision, job.force, log)
    log(f"wrote {out} ({dir_bytes(out) / 2**20:.1f} MiB, {job.precision}); "
        f"run it with onnxruntime_genai.Model('{out}')")
    return out


@dataclass
class ExecutorchJob:
    model: str = ""
    """the MODEL to write (an adapter directory is merged into its base, a factorized model densified)"""
    out: str = ""
    """OUT.pte (the tokenizer, chat template and architecture go to OUT_tokenizer/ beside it)"""
    precision: str = field(default="8da4w", metadata={"choices": EXECUTORCH_PRECISIONS})
    """weights: 8da4w (int8 dynamic activations x int4 weights in groups of 32, 4-bit embedding), int8 (int8 dynamic activations x int8 per-channel weights, 8-bit embedding) or fp32"""
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    """tokens the static KV cache holds (prompt + answer); memory grows with it"""
    force: bool = False
    """replace OUT.pte (and OUT_tokenizer/) if they exist"""


def run_executorch(job: ExecutorchJob, log: Log = print) -> Path:
    """OUT.pte as an ExecuTorch XNNPACK program; refused before loading anything ExecuTorch cannot take."""
    if not job.model or not job.out:
        raise SlmError("give the MODEL to write and the program to write: slm export executorch MODEL OUT.pte")
    check_executorch_target(job.out, job.force)  # before the model loads
    model, tokenizer = _float_model(job.model, log)
    out = write_executorch(model, tokenizer, job.out, job.precision, job.max_seq_len, job.force, log)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {job.precision}) and {sidecar_dir(out).name}/; "
        f"run it with `slm generate {out}` or ExecuTorch's TextLLMRunner('{out}', "
        f"'{sidecar_dir(out) / 'tokenizer.json'}')")
    return out


@dataclass
class LitertJob:
    model: str = ""
    """the MODEL to write (an adapter directory is merged into its base, a factorized model densified)"""
    out: str = ""
    """OUT.tflite (the tokenizer, chat template and architecture go to OUT_tokenizer/ beside it)"""
    precision: str = field(default="int8", metadata={"choices": LITERT_PRECISIONS})
    """weights: int8 (per channel, activations quantized at run time), int4 (blocks of 32, int8 activations) or fp32"""
    max_seq_len: int = LITERT_MAX_SEQ_LEN
    """tokens the caches hold (prompt + answer); each call passes them in and out, so keep it to what you need"""
    force: bool = False
    """replace OUT.tflite (and OUT_tokenizer/) if they exist"""


def run_litert(job: LitertJob, log: Log = print) -> Path:
    """OUT.tflite through litert-torch; refused before loading anything LiteRT cannot take."""
    if not job.model or not job.out:
        raise SlmError("give the MODEL to write and the file to write: slm export litert MODEL OUT.tflite")
    check_litert_target(job.out, job.force)
    model, tokenizer = _float_model(job.model, log)
    out = write_litert(model, tokenizer, job.out, job.precision, job.max_seq_len, job.force, log)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {job.precision}) and {sidecar_dir(out).name}/; "
        f"run it with `slm generate {out}` or LiteRT's Interpreter (signatures prefill and decode)")
    return out


def _float_model(spec: str, log: Log):
    """MODEL as one float model a phone exporter quantizes itself: adapters merged, factors densified,
    a quantized checkpoint refused (quantizing twice compounds the error)."""
    loaded = load_whole(spec, log)
    if quantized_modules(loaded.model):
        raise SlmError(f"'{spec}' is quantized; export its float model and let --precision quantize it with the "
                       "runtime's own recipe (quantizing twice compounds the error)")
    if loaded.model.config.lowrank:
        log(f"densified {densify(loaded.model)} factorized linears")
    return loaded.model, loaded.tokenizer


def _adapter(path: str, base: str | None):
    if not is_adapter_dir(Path(path)):
        raise SlmError(f"'{path}' is not an adapter directory (no adapter_config.json)")
    return load(path, dtype=torch.float32, base=base)


def run_gguf_lora(job: GgufLoraJob, log: Log = print) -> Path:
    if not job.adapter or not job.out:
        raise SlmError("give the adapter directory and OUT.gguf")
    if not job.out.endswith(".gguf"):
        raise SlmError(f"'{job.out}' should end in .gguf")
    loaded = _adapter(job.adapter, job.base)
    out = write_gguf_lora(loaded.model, job.out, Path(job.adapter.rstrip("/")).name)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); run it over a GGUF of its base "
        f"({loaded.source.base}): llama-cli -m BASE.gguf --lora {out}")
    return out


def run_merge(job: MergeJob, log: Log = print) -> Path:
    if not job.base or not job.adapter or not job.out:
        raise SlmError("give the base MODEL, the adapter directory and an output directory (BASE ADAPTER -o OUT)")
    loaded = _adapter(job.adapter, job.base)
    report = merge_adapters(loaded.model)
    dtype = None if loaded.model.config.quantization else getattr(torch, job.dtype)  # codes keep their scales
    out = save_checkpoint(loaded.model, loaded.tokenizer, job.out, dtype)
    log(report.summary())
    log(f"wrote {out}")
    return out


def save_whole(model_spec: str, out: str | Path, log: Log = print) -> Path:
    """MODEL as one complete HF-style directory: an adapter merged into its base, quantized codes
    kept as they are, float weights in fp32."""
    loaded = load_whole(model_spec, log)
    return save_checkpoint(loaded.model, loaded.tokenizer, out)


@dataclass
class ConvertJob:
    src: str = ""
    """GGUF file, HF directory, adapter directory (merged first) or preset with weights"""
    dst: str = ""
    """OUT.gguf for GGUF, anything else for an HF directory"""
    type: str = field(default="f16", metadata={"choices": ("f32", "f16")})
    """GGUF tensor type for matrices"""
    dtype: str = field(default="float32", metadata={"choices": SAVE_DTYPES})
    """safetensors precision for an HF directory"""


def run_convert(job: ConvertJob, log: Log = print) -> Path:
    """GGUF <-> HF directory; an existing file is never overwritten by a directory."""
    if not job.src or not job.dst:
        raise SlmError("give the model to read and where to write it (SRC DST)")
    dst = Path(job.dst)
    if not job.dst.endswith(".gguf") and dst.exists() and not dst.is_dir():
        raise SlmError(f"'{job.dst}' is an existing file, but a name without .gguf means a Hugging Face "
                       "directory; give a new directory name, or end the name in .gguf to write GGUF")
    loaded = load_whole(job.src, log)
    if job.dst.endswith(".gguf"):
        if loaded.tokenizer is None:
            raise SlmError(f"'{job.src}' has no tokenizer; a GGUF file needs one")
        out = write_gguf(loaded.model, loaded.tokenizer, job.dst, job.type)
    else:
        out = save_hf(loaded.model, loaded.tokenizer, job.dst, getattr(torch, job.dtype))
    log(f"wrote {out}")
    return out

"""ONNX Runtime GenAI as a runtime: an `slm export onnx` directory, run by onnxruntime-genai, with
slmkit's sampler choosing every token (`infer.single`).

The runtime computes the logits (its Generator keeps the KV cache); its own search is not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slmkit.errors import SlmError
from slmkit.fileio import dir_bytes, read_json
from slmkit.infer.single import OneSequenceEngine
from slmkit.interop.hf import read_hf_config
from slmkit.interop.onnx import onnx_missing

try:
    import onnxruntime_genai as og
except ImportError:  # the [onnx] extra
    og = None


def is_onnx_dir(spec: str | Path) -> bool:
    """Whether MODEL is an ONNX Runtime GenAI directory."""
    return Path(spec).is_dir() and (Path(spec) / "genai_config.json").is_file()


class OnnxEngine(OneSequenceEngine):
    """An ONNX Runtime GenAI directory as an engine, one prompt at a time."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None, threads: int | None = None):
        if og is None:
            raise SlmError(onnx_missing() or "onnxruntime-genai does not import")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise SlmError(f"'{path}' has no config.json: export it with `slm export onnx` (which writes the "
                           "architecture beside the graph)")
        self.config = read_hf_config(path)
        genai = (read_json(path / "genai_config.json") or {}).get("model", {})
        context = int(genai.get("context_length") or self.config.max_position_embeddings)
        self.max_seq_len = min(max_seq_len or context, context)
        self.vocab_size = int(genai.get("vocab_size") or self.config.vocab_size)
        self.precision = (read_json(path / "slmkit_onnx.json") or {}).get("precision", "graph")
        config = og.Config(str(path))
        if threads:  # the runtime's intra-op pool (its default: one thread per core)
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.path, self.model, self.threads = path, og.Model(config), threads or os.cpu_count() or 1

    def begin(self, prompt: list[int], budget: int) -> torch.Tensor:
        """A fresh Generator (and KV cache) sized for the prompt and its answer."""
        search = og.GeneratorParams(self.model)
        search.set_search_options(max_length=len(prompt) + budget)
        self.generator = og.Generator(self.model, search)
        self.generator.append_tokens(prompt)
        return self._logits(self.generator)

    def feed(self, token: int, position: int) -> torch.Tensor:
        self.generator.append_tokens([token])
        return self._logits(self.generator)

    @staticmethod
    def _logits(generator) -> torch.Tensor:
        return torch.from_numpy(generator.get_logits()[:, -1].copy())  # (1, V), the last position's

    def file_bytes(self) -> int:
        return dir_bytes(self.path)

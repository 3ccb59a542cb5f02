"""LiteRT as a runtime: an `slm export litert` file run by LiteRT's interpreter (its XNNPACK delegate,
as on a phone), with slmkit's sampler choosing every token (`infer.single`).

The caches travel in and out of every call as arrays (the program is functional: `interop.litert`);
a prompt is read in chunks of the prefill signature's length, the last one padded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import SlmError
from slmkit.fileio import dir_bytes
from slmkit.infer.single import OneSequenceEngine
from slmkit.interop.litert import empty_caches, litert_missing
from slmkit.interop.phone import read_sidecar


def is_tflite(spec: str | Path) -> bool:
    return str(spec).endswith(".tflite") and Path(spec).is_file()


class LiteRTEngine(OneSequenceEngine):
    """A LiteRT file as an engine, one prompt at a time."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None, threads: int | None = None):
        missing = litert_missing()
        if missing:
            raise SlmError(missing)
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path)
        self.config, record, self.tokenizer_dir = read_sidecar(path, "slm export litert")
        self.context, self.chunk = int(record["max_seq_len"]), int(record["prefill"])
        self.max_seq_len = min(max_seq_len or self.context, self.context)
        self.vocab_size, self.precision, self.path = self.config.vocab_size, record.get("precision", "file"), path
        self.threads = threads or os.cpu_count() or 1
        self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        self.prefill, self.decode = (self.interpreter.get_signature_runner(n) for n in ("prefill", "decode"))
        self.caches = [c.numpy() for c in empty_caches(self.config, self.context)]

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits (len(tokens), V) after `tokens` written from slot `start` (the caches are kept)."""
        rows = []
        for at in range(0, len(tokens), 1 if len(tokens) == 1 else self.chunk):
            piece = tokens[at:at + self.chunk]
            runner, width = (self.decode, 1) if len(tokens) == 1 else (self.prefill, self.chunk)
            ids = np.zeros((1, width), np.int32)
            ids[0, :len(piece)] = piece
            positions = np.arange(start + at, start + at + width, dtype=np.int32)
            out = runner(args_0=ids, args_1=positions, **{f"args_{i + 2}": c for i, c in enumerate(self.caches)})
            self.caches = [out[f"output_{i + 1}"] for i in range(len(self.caches))]
            rows.append(torch.from_numpy(out["output_0"][0, :len(piece)].copy()))
        return torch.cat(rows)

    def begin(self, prompt: list[int], budget: int) -> torch.Tensor:
        return self.forward(prompt, 0)[-1:]

    def feed(self, token: int, position: int) -> torch.Tensor:
        return self.forward([token], position)

    def file_bytes(self) -> int:
        return self.path.stat().st_size + dir_bytes(self.tokenizer_dir)

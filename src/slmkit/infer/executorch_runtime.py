"""ExecuTorch as a runtime: an `slm export executorch` program (.pte), run by ExecuTorch's Python
runtime (the same C++ runtime and XNNPACK kernels as on a phone), with slmkit's sampler choosing
every token (`infer.single`).

The program keeps its KV cache in its own mutable buffers: a prompt is read in one call from slot 0
and every token after it is written at the next slot, so a new prompt needs no reset (slots past the
current position are never attended to).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from slmkit.errors import SlmError
from slmkit.fileio import dir_bytes
from slmkit.infer.single import OneSequenceEngine
from slmkit.interop.executorch import executorch_missing, load_custom_ops_library
from slmkit.interop.phone import read_sidecar


def is_pte(spec: str | Path) -> bool:
    """Whether MODEL is an ExecuTorch program file."""
    return str(spec).endswith(".pte") and Path(spec).is_file()


def load_method(path: Path, threads: int | None = None):
    """The program's `forward` on ExecuTorch's runtime, with the LLM custom ops' kernels and the
    quantized kernels (embedding_4bit/byte) registered; `threads` sizes its thread pool (its own
    default: one per core).

    Why the pybindings module `_C` and not `executorch.runtime.Runtime`: the latter reaches it through
    `portable_lib`, whose warning import loads all of `executorch.exir` (the exporter: 3 s and 136 MiB
    of memory measured here); `_C` is the same C++ runtime, and Runtime itself only forwards to it."""
    missing = executorch_missing()
    if missing:
        raise SlmError(missing)
    import executorch.extension.pybindings._C as runtime
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_* kernels)

    load_custom_ops_library()
    with runtime_log() as log:
        try:
            if threads:  # before the program loads: XNNPACK keeps the pool it was initialised with
                runtime._unsafe_reset_threadpool(threads)
            program = runtime._load_program(str(path), program_verification=runtime.Verification.Minimal)
            return program, program.load_method("forward")
        except RuntimeError as error:
            log.seek(0)
            raise SlmError(f"ExecuTorch could not load '{path}': {error} ({log.read().strip()[-300:]})") from None


@contextlib.contextmanager
def runtime_log():
    """The runtime's C++ log (written to fd 2: CPU probing lines on every load) kept in a file that is
    read only when loading fails, so `slm generate` prints nothing of it otherwise."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ExecuTorchEngine(OneSequenceEngine):
    """An ExecuTorch program as an engine, one prompt at a time."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None, threads: int | None = None):
        path = Path(path)
        self.config, info, side = read_sidecar(path, "slm export executorch")
        context = int(info["max_seq_len"])
        self.max_seq_len = min(max_seq_len or context, context)
        self.vocab_size = self.config.vocab_size
        self.precision, self.path, self.tokenizer_dir = info.get("precision", "program"), path, side
        self.program, self.method = load_method(path, threads)
        self.threads = threads or os.cpu_count() or 1

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits (1, V) after `tokens` written from slot `start`."""
        inputs = [torch.tensor([tokens], dtype=torch.long), torch.tensor([start], dtype=torch.long)]
        return self.method(inputs)[0].float()

    def begin(self, prompt: list[int], budget: int) -> torch.Tensor:
        return self.forward(prompt, 0)  # the program's cache is overwritten from slot 0

    def feed(self, token: int, position: int) -> torch.Tensor:
        return self.forward([token], position)

    def file_bytes(self) -> int:
        """The program and the files beside it."""
        return self.path.stat().st_size + dir_bytes(self.tokenizer_dir)

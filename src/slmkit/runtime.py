"""How a model runs, declared once: the engines, precisions and GGUF types slmkit offers, the
`Runtime` settings every verb that runs a model nests (generate, chat, eval, bench, serve; each
with its own defaults), the decoding accelerations of the torch engine, and the thread count.

Nothing here loads a model: `slmkit.infer.llamacpp.choose_engine` and the jobs read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ENGINES = ("auto", "torch", "llamacpp")
DTYPES = ("bfloat16", "float32")
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # safetensors precisions a float checkpoint is written in
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m")  # what `slm export gguf` writes
RUNTIME_GGUF_TYPES = ("q8_0", "q4_0", "q4_k_m", "f16")  # what the llama.cpp engine exports a model to


@dataclass
class Runtime:
    """Where and how a model runs."""

    engine: str = field(default="auto", metadata={"choices": ENGINES})
    """llamacpp exports the model to GGUF once (cached) and runs it in llama.cpp, ~4x faster on a CPU; torch is slmkit's PyTorch engine (the parity reference; the weights as they are); auto: llamacpp when installed and the model exports to GGUF"""
    dtype: str = field(default="bfloat16", metadata={"choices": DTYPES})
    """weight precision in memory on the torch engine (bfloat16: half the memory traffic of float32)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""
    context: int | None = None
    """maximum tokens in a sequence, prompt included (default: the model's own limit; the server's llama.cpp engine, which reserves every sequence's cache up front, gives 2048)"""
    gguf_type: str = field(default="q8_0", metadata={"choices": RUNTIME_GGUF_TYPES})
    """GGUF type of the export the llamacpp engine runs (a GGUF model runs as it is)"""


@dataclass
class Decoding:
    """The torch engine's decoding accelerations (generate and chat)."""

    compile: bool = False
    """torch.compile the decode step (torch engine): ~1.5-2x faster decoding after 2-5 min of compiling on first use (1-2 min on later starts, from inductor's cache)"""
    speculate: str | None = field(default=None, metadata={"metavar": "lookup|draft=MODEL"})
    """speculative decoding, same text: 'lookup' drafts by matching the prompt's n-grams (good for summaries and extraction); 'draft=MODEL' drafts with a smaller model of the same tokenizer (e.g. a distilled student)"""
    draft_tokens: int = 4
    """guesses verified per pass with speculate"""


def use_threads(threads: int | None) -> None:
    """Run torch on `threads` CPU threads (None: leave torch's default, all cores)."""
    if threads:
        torch.set_num_threads(threads)

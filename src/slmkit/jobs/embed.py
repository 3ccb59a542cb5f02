"""`slm embed MODEL FILE -o out.npy`: one L2-normalised vector per text (`slmkit.infer.embed`),
saved as a float32 NumPy array in the file's row order.

FILE is a .jsonl (the `text` field of each row, or --field) or a .txt (one text per line)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slmkit.data.readers import json_records
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write
from slmkit.infer.embed import Embedder
from slmkit.infer.llamacpp import LlamaCppEmbedder, LlamaCppEngine, runtime_files
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL
from slmkit.runtime import RUNTIME_GGUF_TYPES, use_threads


@dataclass
class EmbedJob:
    model: str = DEFAULT_MODEL
    """the MODEL whose final hidden states embed the texts (GGUF, HF directory, adapter directory or the bundled model)"""
    input: str = ""
    """texts: a .jsonl (one row per text, its `field`) or a .txt (one text per line)"""
    output: str = field(default="", metadata={"flag": ("-o", "--output")})
    """the vectors: a .npy of shape (texts, hidden size), float32, rows in the input's order"""
    text_field: str = field(default="text", metadata={"flag": "--field"})
    """the JSONL field that holds each text"""
    batch_size: int = 32
    """texts per forward pass (vectors do not depend on it)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""
    engine: str = field(default="torch", metadata={"choices": ("torch", "llamacpp")})
    """torch: slmkit's PyTorch model in float32 (the reference); llamacpp: llama.cpp's embeddings mode on a GGUF export (a GGUF model runs as it is)"""
    gguf_type: str = field(default="q8_0", metadata={"choices": RUNTIME_GGUF_TYPES})
    """GGUF type of the export the llamacpp engine runs"""


def read_texts(path: str, key: str) -> list[str]:
    """The texts of a .jsonl (field `key` of each row) or .txt file; a bad row names its line."""
    file = Path(path)
    if not file.is_file():
        raise SlmError(f"input file '{path}' not found (give a .jsonl or .txt of texts to embed)")
    if file.suffix == ".txt":
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        raise SlmError(f"'{path}' is neither .jsonl nor .txt")
    texts = []
    for where, row in json_records(file):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise SlmError(f"{where}: no text in field '{key}' (choose the field with --field)")
        texts.append(row[key])
    return texts


def run_embed(job: EmbedJob) -> Path:
    if not job.input or not job.output:
        raise SlmError("give the texts and where the vectors go: slm embed MODEL FILE.jsonl -o vectors.npy")
    if not job.output.endswith(".npy"):
        raise SlmError(f"the output '{job.output}' must end in .npy (a NumPy array)")
    texts = read_texts(job.input, job.text_field)  # checked before the model loads
    use_threads(job.threads)
    embedder = load_embedder(job.model, job.engine, job.gguf_type, job.batch_size)
    ids = embedder.encode(texts)
    embedder.check(ids)  # every text fits, or one line naming the first that does not, before the bar starts
    with tqdm(total=len(texts), desc="embedding", unit="text", file=sys.stderr) as bar:
        result = embedder.embed_ids(ids, progress=bar.update)
    out = Path(job.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: _save(tmp, result.vectors.numpy()))
    print(f"wrote {out}: {len(texts)} vectors of {embedder.dimensions} dimensions ({sum(result.tokens):,} tokens)")
    return out


def load_embedder(model: str, engine: str, gguf_type: str = "q8_0", batch_size: int = 32) -> Embedder:
    """An embedder of `model` on slmkit's PyTorch engine (float32) or on llama.cpp."""
    if engine == "llamacpp":
        files = runtime_files(model, gguf_type, progress=lambda m: print(m, file=sys.stderr))
        return LlamaCppEmbedder(LlamaCppEngine.for_files(files), files.tokenizer, batch_size)
    loaded = load(model, dtype=torch.float32)
    return Embedder(loaded.model, loaded.tokenizer, batch_size)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would add .npy to the temporary name
        np.save(f, array.astype(np.float32))

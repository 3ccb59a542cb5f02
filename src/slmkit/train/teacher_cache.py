"""Teacher-output cache, and the fixed-chunk batches that distillation trains on.

Pretraining's random windows start anywhere, so a teacher's outputs for them cannot be computed
once and stored. Distillation therefore reads the training split as fixed chunks: chunk i holds
tokens [i*T, i*T + T + 1), its inputs the first T and its targets the last T. The teacher runs once
over every chunk and its top-k next-token log-probabilities are stored on disk

    CACHE/indices.npy    (chunks, T, k) uint16 (or int32 for vocabularies over 65,536)
    CACHE/logprobs.npy   (chunks, T, k) float16, log-probabilities at temperature 1
    CACHE/meta.json      teacher, data fingerprint, T, k, chunk count (a cache is reused only if all match)

so student epochs never pay for the teacher again. The cache is built in CACHE.partial and moved into
place: an interrupted build leaves no cache that looks complete.

Batch order: chunks are visited in a fresh seeded permutation every epoch, and the chunks of
optimizer step s are a pure function of (seed, s), like `RandomWindows`: resume needs only the step,
and a global batch is the same for any split over gradient accumulation and ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slmkit.data.loader import Layout, TokenStream
from slmkit.errors import SlmError
from slmkit.fileio import partial_dir, replace_dir
from slmkit.train.kd import topk_logprobs


def count_chunks(stream: TokenStream, seq_len: int, max_tokens: int = 0) -> int:
    """Chunks of `seq_len` inputs (+1 target) in the split, capped at `max_tokens` (0 = no cap)."""
    n = (stream.size - 1) // seq_len
    if max_tokens:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise SlmError(f"the training split has {stream.size:,} tokens, fewer than one chunk of {seq_len + 1}; "
                       "lower seq_len or prepare more data")
    return n


def cache_bytes(chunks: int, seq_len: int, k: int, vocab_size: int) -> int:
    index_bytes = 2 if vocab_size <= 65536 else 4
    return chunks * seq_len * k * (index_bytes + 2)


class Chunks:
    """Training batches of fixed chunks (plus the teacher's cached top-k when a cache is given)."""

    def __init__(self, stream: TokenStream, seq_len: int, layout: Layout, seed: int, chunks: int,
                 cache: TeacherCache | None = None):
        self.stream, self.seq_len, self.layout, self.seed, self.n = stream, seq_len, layout, seed, chunks
        self.cache = cache

    def chunk_ids(self, step: int) -> torch.Tensor:
        """(grad_accum, world * micro_batch) chunk indices of optimizer step `step`."""
        size = self.layout.global_batch
        positions = torch.arange(step * size, (step + 1) * size)
        epochs = positions // self.n
        ids = torch.empty(size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            mine = epochs == epoch
            ids[mine] = perm[positions[mine] % self.n]
        return ids.view(self.layout.grad_accum, -1)

    def batch(self, step: int, micro: int, rank: int = 0) -> dict[str, torch.Tensor]:
        m = self.layout.micro_batch
        ids = self.chunk_ids(step)[micro, rank * m:(rank + 1) * m].tolist()
        rows = np.stack([self.stream.read(i * self.seq_len, self.seq_len + 1) for i in ids]).astype(np.int64)
        data = torch.from_numpy(rows)
        out = {"input_ids": data[:, :-1], "targets": data[:, 1:]}
        if self.cache is not None:
            out.update(self.cache.rows(ids))
        return out


class TeacherCache:
    """A built cache, memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.indices = np.load(directory / "indices.npy", mmap_mode="r")
        self.logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")

    def rows(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return {"teacher_indices": torch.from_numpy(self.indices[ids].astype(np.int64)),
                "teacher_logprobs": torch.from_numpy(self.logprobs[ids].astype(np.float32))}


def open_or_build(directory: str | Path, teacher, stream: TokenStream, seq_len: int, chunks: int, k: int,
                  identity: dict, batch_size: int = 8, log=print) -> TeacherCache:
    """Reuse the cache at `directory` if it was built for `identity`, T, k and the chunk count; else build it."""
    directory = Path(directory)
    wanted = {**identity, "seq_len": seq_len, "top_k": k, "chunks": chunks}
    if (directory / "meta.json").is_file():
        cache = TeacherCache(directory)
        if {key: cache.meta.get(key) for key in wanted} == wanted:
            log(f"teacher cache: reusing {directory} ({chunks} chunks x {seq_len} tokens, top-{k})")
            return cache
        raise SlmError(f"teacher cache '{directory}' was built for other settings "
                       f"({ {key: cache.meta.get(key) for key in wanted if cache.meta.get(key) != wanted[key]} }); "
                       "delete it or set kd.cache to another directory")
    if directory.exists():
        raise SlmError(f"'{directory}' exists but is not a teacher cache (no meta.json); choose another kd.cache")
    vocab = teacher.config.vocab_size
    size = cache_bytes(chunks, seq_len, k, vocab)
    log(f"teacher cache: {chunks:,} chunks x {seq_len} tokens x top-{k} = {size / 2**20:,.1f} MiB on disk; "
        f"one teacher pass over {chunks * seq_len:,} tokens")
    tmp = partial_dir(directory)
    _fill(tmp, teacher, stream, seq_len, chunks, k, np.uint16 if vocab <= 65536 else np.int32, batch_size)
    (tmp / "meta.json").write_text(json.dumps({**wanted, "format": 1, "bytes": size}, indent=2) + "\n")
    replace_dir(tmp, directory)
    return TeacherCache(directory)


@torch.no_grad()
def _fill(tmp: Path, teacher, stream: TokenStream, seq_len: int, chunks: int, k: int, index_dtype,
          batch_size: int) -> None:
    indices = np.lib.format.open_memmap(tmp / "indices.npy", mode="w+", dtype=index_dtype, shape=(chunks, seq_len, k))
    logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float16, shape=(chunks, seq_len, k))
    teacher.eval()
    device = next(teacher.parameters()).device
    with tqdm(total=chunks * seq_len, desc="teacher cache", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for start in range(0, chunks, batch_size):
            ids = range(start, min(start + batch_size, chunks))
            rows = np.stack([stream.read(i * seq_len, seq_len) for i in ids]).astype(np.int64)
            top = topk_logprobs(teacher(torch.from_numpy(rows).to(device)), k)  # (b, T, k)
            indices[ids.start:ids.stop] = top.indices.cpu().numpy().astype(index_dtype)
            logprobs[ids.start:ids.stop] = top.logprobs.cpu().numpy().astype(np.float16)
            bar.update(len(ids) * seq_len)
    indices.flush()
    logprobs.flush()

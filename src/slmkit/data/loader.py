"""Batches from packed token shards (the output of `slm prepare`).

Training batches are random windows (nanoGPT style), but not drawn from a running random stream:
the windows of optimizer step s are a pure function of (seed, s). Resuming therefore needs only
the step number, and a global batch is the same set of windows however it is split across
gradient-accumulation steps and data-parallel ranks (rank r takes its own slice of each micro
step). Validation uses fixed consecutive windows, split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.data.shards import read_meta
from slmkit.errors import SlmError


class TokenStream:
    """The shards of one split, read as one sequence of token ids (memory-mapped)."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        meta = read_meta(directory)
        self.meta = meta
        dtype = np.dtype(meta["dtype"])
        self.shards = [np.memmap(directory / name, dtype=dtype, mode="r")
                       for name in meta["shards"].get(split, []) if (directory / name).stat().st_size]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.size = int(self.starts[-1])

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length), across shard boundaries."""
        pieces = []
        while length > 0:
            shard = int(np.searchsorted(self.starts, offset, side="right") - 1)
            piece = self.shards[shard][offset - int(self.starts[shard]):][:length]
            pieces.append(piece)
            offset, length = offset + len(piece), length - len(piece)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class Layout:
    """How one optimizer step's global batch is divided."""

    micro_batch: int  # sequences per forward pass on one rank
    grad_accum: int  # forward passes per optimizer step
    world: int = 1  # data-parallel ranks

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world


class RandomWindows:
    """Training batches: (inputs, targets) of shape (micro_batch, seq_len), targets shifted by one."""

    def __init__(self, stream: TokenStream, seq_len: int, layout: Layout, seed: int):
        needed = layout.global_batch * (seq_len + 1)
        if stream.size < needed:
            raise SlmError(f"the training split has {stream.size:,} tokens, fewer than one global batch "
                           f"({layout.global_batch} x {seq_len + 1} = {needed:,}); lower micro_batch_size, "
                           "grad_accum or seq_len, or prepare more data")
        self.stream, self.seq_len, self.layout, self.seed = stream, seq_len, layout, seed

    def offsets(self, step: int) -> torch.Tensor:
        """(grad_accum, world * micro_batch) window starts of step `step`."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = self.stream.size - self.seq_len - 1
        flat = torch.randint(0, high + 1, (self.layout.global_batch,), generator=gen)
        return flat.view(self.layout.grad_accum, -1)

    def batch(self, step: int, micro: int, rank: int = 0) -> dict[str, torch.Tensor]:
        m = self.layout.micro_batch
        starts = self.offsets(step)[micro, rank * m:(rank + 1) * m].tolist()
        rows = np.stack([self.stream.read(s, self.seq_len + 1) for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return {"input_ids": data[:, :-1], "targets": data[:, 1:]}


def validation_batches(stream: TokenStream, seq_len: int, micro_batch: int, max_tokens: int,
                       rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows (up to `max_tokens` targets), this rank's share."""
    count = min((stream.size - 1) // seq_len, max(1, max_tokens // seq_len))
    if count < 1:
        raise SlmError(f"the validation split has {stream.size} tokens, fewer than one window of "
                       f"{seq_len + 1}; lower seq_len or prepare with a larger val_fraction")
    mine = list(range(rank, count, world))
    batches = []
    for i in range(0, len(mine), micro_batch):
        rows = np.stack([stream.read(w * seq_len, seq_len + 1) for w in mine[i:i + micro_batch]])
        data = torch.from_numpy(rows.astype(np.int64))
        batches.append({"input_ids": data[:, :-1], "targets": data[:, 1:]})
    return batches

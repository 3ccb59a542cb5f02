"""Batches of whole fine-tuning examples, a pure function of (seed, step) as the pretraining windows are.

Every epoch visits the examples in its own seeded order; training row p of the run (counted over
optimizer steps, gradient-accumulation steps and data-parallel ranks exactly as `RandomWindows`
counts windows) is a pure function of p, so a resumed run needs only its step number and a global
batch is the same however it is split.

A row is one example, right-padded to the longest row of its micro batch; or, with packing,
several examples laid end to end in `seq_len` tokens, each with its own segment id and positions
from 0, so the model's attention keeps them apart (no example sees another) and RoPE sees each
as if it were alone. Inputs are an example's tokens but the last, targets its tokens but the
first where they are trained, else IGNORE.
"""

from __future__ import annotations

import functools

import torch

from slmkit.data.loader import Layout
from slmkit.data.sft import Encoded
from slmkit.errors import SlmError

IGNORE = -100  # a target that contributes no loss (padding, prompt tokens); the training losses use it too


def example_row(example: Encoded) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: next-token pairs, untrained targets set to IGNORE."""
    ids, trained = example.ids, example.trained
    return ids[:-1], [t if k else IGNORE for t, k in zip(ids[1:], trained[1:])]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (inputs, targets) rows to the longest: (B, T) input_ids and targets."""
    width = max(len(inputs) for inputs, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (inputs, target) in enumerate(rows):
        ids[r, : len(inputs)] = torch.tensor(inputs)
        targets[r, : len(target)] = torch.tensor(target)
    return {"input_ids": ids, "targets": targets}


class ExampleBatches:
    def __init__(self, examples: list[Encoded], seq_len: int, layout: Layout, seed: int, packing: bool = False,
                 pad_id: int = 0):
        if not examples:
            raise SlmError("no training examples")
        if any(len(e.ids) > seq_len + 1 for e in examples):
            raise SlmError(f"an example is longer than seq_len + 1 = {seq_len + 1} tokens; fit them first")
        self.examples, self.seq_len, self.layout, self.seed = examples, seq_len, layout, seed
        self.packing, self.pad_id = packing, pad_id

    # -- which examples a row holds ------------------------------------------------------------

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    @functools.lru_cache(maxsize=4)
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The example indices of each row of an epoch (one each, or packed end to end)."""
        order = self.order(epoch)
        if not self.packing:
            return [[i] for i in order]
        rows, current, used = [], [], 0
        for i in order:
            size = len(self.examples[i].ids) - 1
            if current and used + size > self.seq_len:
                rows.append(current)
                current, used = [], 0
            current.append(i)
            used += size
        return rows + [current]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def row(self, p: int) -> list[int]:
        """Row p of the whole run."""
        epoch = 0
        while p >= len(self.epoch_rows(epoch)):
            p -= len(self.epoch_rows(epoch))
            epoch += 1
        return self.epoch_rows(epoch)[p]

    # -- the loop's interface ------------------------------------------------------------------

    def batch(self, step: int, micro: int, rank: int = 0) -> dict[str, torch.Tensor]:
        m, world = self.layout.micro_batch, self.layout.world
        first = step * self.layout.global_batch + micro * world * m + rank * m
        rows = [self.row(p) for p in range(first, first + m)]
        if not self.packing:
            return pad_rows([example_row(self.examples[r[0]]) for r in rows], self.pad_id)
        return self._packed(rows)

    def _packed(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        b, t = len(rows), self.seq_len
        out = {"input_ids": torch.full((b, t), self.pad_id, dtype=torch.long),
               "targets": torch.full((b, t), IGNORE, dtype=torch.long),
               "segment_ids": torch.full((b, t), -1, dtype=torch.long),
               "positions": torch.zeros((b, t), dtype=torch.long)}
        for r, members in enumerate(rows):
            start = 0
            for segment, i in enumerate(members):
                inputs, targets = example_row(self.examples[i])
                end = start + len(inputs)
                out["input_ids"][r, start:end] = torch.tensor(inputs)
                out["targets"][r, start:end] = torch.tensor(targets)
                out["segment_ids"][r, start:end] = segment
                out["positions"][r, start:end] = torch.arange(len(inputs))
                start = end
        return out


def validation_batches(examples: list[Encoded], micro_batch: int, pad_id: int = 0, rank: int = 0,
                       world: int = 1) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the validation examples, in order, padded per micro batch."""
    mine = [example_row(e) for e in examples[rank::world]]
    return [pad_rows(mine[i:i + micro_batch], pad_id) for i in range(0, len(mine), micro_batch)]

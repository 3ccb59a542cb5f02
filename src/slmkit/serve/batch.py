"""The KV cache of a batch whose rows join and leave between decode steps (continuous batching).

The model's `KVCache` gives every row the same slot numbers: a decode step writes slot `length`
in every row at once. Rows that joined at different times are therefore right-aligned: a row with
n tokens holds slots [length - n, length) and `key_valid` masks the slots before them, while its
RoPE positions count its own tokens only (the scheduler passes them), so each row computes exactly
what it would compute alone.

Why our own and not a paged cache (vLLM): `model.py` attends over one dense tensor per layer, and at
a few hundred slots and a batch of 8 a whole-cache copy when a row joins or leaves costs a few tens
of milliseconds, less than one decode step of the batch; the simple layout keeps the model unchanged.
"""

from __future__ import annotations

import torch

from slmkit.model import CausalLM, KVCache

HEADROOM = 64  # slots allocated beyond the current need, so most steps never reallocate


class BatchCache:
    """Rows of a decode batch, each a right-aligned run of filled slots ending at `cache.length`."""

    def __init__(self, model: CausalLM, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.cache: KVCache | None = None  # None while the batch is empty
        self.rows = 0

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def add(self, prefilled: KVCache, row: int = 0, first_slot: int = 0) -> int:
        """Append row `row` of a prefilled cache, whose tokens fill slots [first_slot, length) (a left-
        padded prefill of several prompts), as a new row; returns its index in the batch."""
        n = prefilled.length - first_slot
        old, rows, length = self.cache, self.rows, max(self.length, n)
        new = self._allocate(rows + 1, length + HEADROOM, length)
        if old is not None:  # old rows move right so that they still end at `length`
            new.copy_from(old, slice(0, rows), length - old.length, slice(None), slice(0, old.length))
        new.copy_from(prefilled, rows, length - n, row, slice(first_slot, prefilled.length))
        self.cache, self.rows = new, rows + 1
        return rows

    def remove(self, keep: list[int]) -> None:
        """Keep only the rows `keep` (in that order), dropping slots no remaining row uses."""
        if not keep:
            self.cache, self.rows = None, 0
            return
        old, index = self.cache, torch.tensor(keep)
        first = int(old.key_valid[index, : old.length].any(0).int().argmax())  # slots every kept row masks
        new = self._allocate(len(keep), old.length - first + HEADROOM, old.length - first)
        new.copy_from(old, slice(None), 0, index, slice(first, old.length))
        self.cache, self.rows = new, len(keep)

    def before_step(self, slots: int = 1) -> KVCache:
        """Make room for `slots` more slots (one per decode step; more to verify a speculative guess)
        and mark them valid in every row; returns the model's cache."""
        cache = self.cache
        if cache.length + slots > cache.max_len:
            grown = self._allocate(self.rows, cache.length + slots + HEADROOM, cache.length)
            grown.copy_from(cache, slice(None), 0, slice(None), slice(0, cache.length))
            self.cache = cache = grown
        cache.open_slot(slots)
        return cache

    def _allocate(self, rows: int, slots: int, length: int) -> KVCache:
        cache = self.model.new_cache(rows, slots, self.dtype)
        cache.restart(torch.zeros(rows, slots, dtype=torch.bool))
        cache.rewind(length)
        return cache

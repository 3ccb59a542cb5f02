"""Prefix caching: the KV state of recent prompts, so a request that starts the same way (a shared
system prompt, few-shot examples, the earlier turns of a chat) runs only the tokens that are new.

Engine-neutral: an entry holds whatever its runner's `snapshot` returned (the torch runner's
per-layer key/value tensors, llama.cpp's serialized sequence state) and its size in bytes; the
cache keeps entries under a byte budget, evicting the least recently used first.

Why our own and not vLLM-style hashed blocks: a server here holds tens of prompts, not millions,
and both engines restore a whole prefix at once (a tensor copy, one llama_state_seq_set_data), so
a flat LRU scanned per request (microseconds per entry) is all the bookkeeping that pays.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

MIN_REUSE = 4  # tokens: shorter shared prefixes are recomputed (restoring costs more than they save)


@dataclass
class Entry:
    tokens: tuple[int, ...]
    state: object  # the runner's snapshot of a sequence holding exactly `tokens`
    nbytes: int


@dataclass
class Hit:
    tokens: int  # leading prompt tokens whose KV is restored (never the prompt's last token)
    entry: Entry


def shared_length(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], Entry] = collections.OrderedDict()  # oldest first
        self.bytes = 0
        self.lookups = self.hits = self.reused_tokens = self.evictions = 0

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The entry sharing the longest prefix with `prompt` (it becomes the most recently used);
        the prompt's last token is never reused, as it must run for the next token's logits."""
        self.lookups += 1
        best, length = None, 0
        for entry in self.entries.values():
            n = min(shared_length(entry.tokens, prompt), len(prompt) - 1)
            if n > length:
                best, length = entry, n
        if best is None or length < MIN_REUSE:
            return None
        self.entries.move_to_end(best.tokens)
        self.hits += 1
        self.reused_tokens += length
        return Hit(length, best)

    def covers(self, tokens: list[int]) -> bool:
        """Whether an entry already holds these tokens (or a longer sequence starting with them)."""
        return any(len(key) >= len(tokens) and shared_length(key, tokens) == len(tokens) for key in self.entries)

    def store(self, tokens: list[int], state: object, nbytes: int) -> None:
        """Keep a snapshot of a sequence holding `tokens`; entries it extends are dropped (it covers
        them), then the least recently used ones until the budget holds."""
        if nbytes > self.budget:
            return
        key = tuple(tokens)
        for old in [k for k in self.entries if len(k) <= len(key) and key[:len(k)] == k]:
            self._drop(old)
        self.entries[key] = Entry(key, state, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget:
            self._drop(next(iter(self.entries)))
            self.evictions += 1

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self.entries.pop(key).nbytes

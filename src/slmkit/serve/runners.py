"""The forward passes behind the server's scheduler, one class per engine.

The `Scheduler` owns everything that does not depend on the engine (queue, rows, sampling,
streaming, retiring); a runner owns the model and the batch's KV state:

- `prefill(prompts, all_logits)` runs prompts that join together and returns one handle and one
  logits tensor per prompt ((T, V) with all_logits, else (1, V));
- `admit(handle)` makes a prefilled prompt a row of the decode batch (appended last), `release(handle)`
  drops one that will not decode (an echo-only scoring request);
- `step(tokens, positions)` feeds one token per row and returns the rows' next logits (B, V);
- `keep(rows)` keeps only those rows, in that order; `reset()` forgets every row;
- `snapshot(handle)` copies a prefilled prompt's KV state for the prefix cache (`slmkit.serve.prefix`),
  with its size in bytes;
- `verify(tokens, position)` feeds several tokens to the batch's only row (a speculative guess) and
  returns the logits after each; `discard(position, count)` forgets the last `count` of them.

`TorchRunner` runs slmkit's PyTorch model over `BatchCache` (left-padded prefill, right-aligned
decode batch); it prefills whole prompts (`prefill_reusing` for one that starts with a cached prefix).
`LlamaCppRunner` runs llama.cpp with one sequence id per row of its batch API, and is `chunked`: a
prompt gets its sequence from `open` (restoring a cached prefix) and is then fed in pieces, which
`run` packs into the same llama_decode as the decode step of the running rows.
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import default_cache_dtype, left_padded
from slmkit.infer.llamacpp import LlamaCppEngine
from slmkit.layers import prepare_for_cpu_inference
from slmkit.serve.batch import BatchCache
from slmkit.serve.prefix import Hit


class TorchRunner:
    name = "torch"
    chunked = False

    def __init__(self, model):
        self.model = prepare_for_cpu_inference(model.eval())
        self.config = self.model.config
        self.max_seq_len = self.config.max_position_embeddings
        self.cache_dtype = default_cache_dtype(model)
        self.batch = BatchCache(self.model, self.cache_dtype)

    def prefill(self, prompts: list[list[int]], all_logits: bool):
        """One left-padded pass (padding on the left puts every row's last token in the last column;
        padded slots are masked and RoPE positions count each row's own tokens, as in `Engine`)."""
        longest = max(len(p) for p in prompts)
        ids, valid, positions = left_padded(prompts, longest)  # (J, T) each
        cache = self.model.new_cache(len(prompts), longest, self.cache_dtype)
        cache.restart(valid if min(len(p) for p in prompts) < longest else None)
        logits = self.model(ids, cache=cache, positions=positions, logits_to_keep=0 if all_logits else 1).float()
        handles = [(cache, row, longest - len(p)) for row, p in enumerate(prompts)]
        return handles, [logits[row, longest - len(p):] if all_logits else logits[row] for row, p in enumerate(prompts)]

    def prefill_reusing(self, prompt: list[int], hit: Hit):
        """One prompt whose first `hit.tokens` tokens' keys and values are copied from the prefix
        cache; only the rest runs. Returns (handle, (1, V) logits) as `prefill` does."""
        cache = self.model.new_cache(1, len(prompt), self.cache_dtype)
        cache.restart()
        for layer, (key, value) in enumerate(hit.entry.state):  # (K, T, D) each
            cache.keys[layer][0, :, :hit.tokens] = key[:, :hit.tokens]
            cache.values[layer][0, :, :hit.tokens] = value[:, :hit.tokens]
        cache.rewind(hit.tokens)
        positions = torch.arange(hit.tokens, len(prompt))[None]
        logits = self.model(torch.tensor(prompt[hit.tokens:])[None], cache=cache, positions=positions,
                            logits_to_keep=1).float()
        return (cache, 0, 0), logits[0]

    def snapshot(self, handle) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The prompt's keys and values, (K, T, D) per layer, copied out of its prefill cache."""
        cache, row, first = handle
        state = [(k[row, :, first:cache.length].clone(), v[row, :, first:cache.length].clone())
                 for k, v in zip(cache.keys, cache.values)]
        return state, sum(k.nbytes + v.nbytes for k, v in state)

    def admit(self, handle) -> None:
        self.batch.add(*handle)

    def release(self, handle) -> None:
        pass  # the prefill cache is dropped with its last handle

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        cache = self.batch.before_step()
        step = self.model(torch.tensor(tokens)[:, None], cache=cache, positions=torch.tensor(positions)[:, None])
        return step[:, -1].float()  # (B, V)

    def verify(self, tokens: list[int], position: int) -> torch.Tensor:
        """Feed `tokens` to the only row from RoPE position `position`; (len(tokens), V) logits."""
        cache = self.batch.before_step(len(tokens))
        positions = torch.arange(position, position + len(tokens))[None]
        return self.model(torch.tensor(tokens)[None], cache=cache, positions=positions)[0].float()

    def discard(self, position: int, count: int) -> None:
        self.batch.cache.rewind(self.batch.cache.length - count)

    def keep(self, rows: list[int]) -> None:
        self.batch.remove(rows)

    def reset(self) -> None:
        self.batch = BatchCache(self.model, self.cache_dtype)


class LlamaCppRunner:
    """One llama.cpp sequence id per row; a row that leaves frees its sequence's cache at once."""

    name = "llamacpp"
    chunked = True

    def __init__(self, engine: LlamaCppEngine):
        self.engine, self.config, self.max_seq_len = engine, engine.config, engine.max_seq_len
        self.batch_tokens = engine.batch_tokens
        self.free = list(range(engine.sequences))
        self.rows: list[int] = []  # the sequence id of each row of the batch

    def open(self, hit: Hit | None = None) -> int:
        """A sequence for a new prompt (the lowest free id: llama.cpp splits a batch whose sequence ids
        have gaps into more passes), holding the hit's cached prefix when there is one."""
        if not self.free:
            raise SlmError(f"every one of llama.cpp's {self.engine.sequences} sequences is in use")
        self.free.sort()
        seq = self.free.pop(0)
        if hit is not None:
            try:
                self.engine.load_sequence(seq, hit.entry.state)
                if len(hit.entry.tokens) > hit.tokens:
                    self.engine.trim_sequence(seq, hit.tokens)
            except SlmError:
                self.release(seq)
                raise
        return seq

    def prefill(self, prompts: list[list[int]], all_logits: bool):
        seqs = [self.open() for _ in prompts]
        return seqs, self.engine.prefill_sequences(seqs, prompts, all_logits)

    def run(self, feed: list[tuple[int, int]], pieces: list[tuple[int, list[int], int, bool]]):
        """One llama_decode (or as few as the batch size allows) over a decode step of the rows
        (token, position) per row and prompt pieces (sequence, tokens, first position, whether the
        piece ends its prompt). Returns the rows' next logits (B, V) and the last logits (V,) of each
        piece that ends its prompt."""
        entries = [(seq, token, position, True) for seq, (token, position) in zip(self.rows, feed)]
        for seq, tokens, first, last in pieces:
            entries += [(seq, token, first + i, last and i == len(tokens) - 1) for i, token in enumerate(tokens)]
        logits = self.engine.run(entries) if entries else torch.empty(0, self.engine.vocab_size)
        return logits[:len(feed)], list(logits[len(feed):])

    def snapshot(self, seq: int) -> tuple[bytes, int]:
        state = self.engine.save_sequence(seq)
        return state, len(state)

    def admit(self, seq: int) -> None:
        self.rows.append(seq)

    def release(self, seq: int) -> None:
        self.engine.free_sequence(seq)
        self.free.append(seq)

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self.engine.step(list(zip(self.rows, tokens, positions)))

    def verify(self, tokens: list[int], position: int) -> torch.Tensor:
        seq = self.rows[0]
        return self.engine.run([(seq, token, position + i, True) for i, token in enumerate(tokens)])

    def discard(self, position: int, count: int) -> None:
        self.engine.trim_sequence(self.rows[0], position)

    def keep(self, rows: list[int]) -> None:
        kept = [self.rows[i] for i in rows]
        for seq in set(self.rows) - set(kept):
            self.release(seq)
        self.rows = kept

    def reset(self) -> None:
        for seq in self.rows:
            self.release(seq)
        self.rows = []

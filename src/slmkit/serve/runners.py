"""The forward passes behind the server's scheduler, one class per engine.

The `Scheduler` owns everything that does not depend on the engine (queue, rows, sampling,
streaming, retiring); a runner owns the model and the batch's KV state:

- `prefill(prompts, all_logits)` runs prompts that join together and returns one handle and one
  logits tensor per prompt ((T, V) with all_logits, else (1, V));
- `admit(handle)` makes a prefilled prompt a row of the decode batch (appended last), `release(handle)`
  drops one that will not decode (an echo-only scoring request);
- `step(tokens, positions)` feeds one token per row and returns the rows' next logits (B, V);
- `keep(rows)` keeps only those rows, in that order; `reset()` forgets every row.

`TorchRunner` runs slmkit's PyTorch model over `BatchCache` (left-padded prefill, right-aligned
decode batch); `LlamaCppRunner` runs llama.cpp with one sequence id per row of its batch API.
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import default_cache_dtype, left_padded
from slmkit.infer.llamacpp import LlamaCppEngine
from slmkit.layers import prepare_for_cpu_inference
from slmkit.serve.batch import BatchCache


class TorchRunner:
    name = "torch"

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

    def admit(self, handle) -> None:
        self.batch.add(*handle)

    def release(self, handle) -> None:
        pass  # the prefill cache is dropped with its last handle

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        cache = self.batch.before_step()
        step = self.model(torch.tensor(tokens)[:, None], cache=cache, positions=torch.tensor(positions)[:, None])
        return step[:, -1].float()  # (B, V)

    def keep(self, rows: list[int]) -> None:
        self.batch.remove(rows)

    def reset(self) -> None:
        self.batch = BatchCache(self.model, self.cache_dtype)


class LlamaCppRunner:
    """One llama.cpp sequence id per row; a row that leaves frees its sequence's cache at once."""

    name = "llamacpp"

    def __init__(self, engine: LlamaCppEngine):
        self.engine, self.config, self.max_seq_len = engine, engine.config, engine.max_seq_len
        self.free = list(range(engine.sequences))
        self.rows: list[int] = []  # the sequence id of each row of the batch

    def prefill(self, prompts: list[list[int]], all_logits: bool):
        if len(prompts) > len(self.free):
            raise SlmError(f"{len(prompts)} requests joined but llama.cpp has {len(self.free)} free sequences")
        self.free.sort()
        seqs = [self.free.pop(0) for _ in prompts]
        return seqs, self.engine.prefill_sequences(seqs, prompts, all_logits)

    def admit(self, seq: int) -> None:
        self.rows.append(seq)

    def release(self, seq: int) -> None:
        self.engine.free_sequence(seq)
        self.free.append(seq)

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self.engine.step(list(zip(self.rows, tokens, positions)))

    def keep(self, rows: list[int]) -> None:
        kept = [self.rows[i] for i in rows]
        for seq in set(self.rows) - set(kept):
            self.release(seq)
        self.rows = kept

    def reset(self) -> None:
        for seq in self.rows:
            self.release(seq)
        self.rows = []

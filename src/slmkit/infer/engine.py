"""Generation on token ids: prefill the prompt into a static KV cache, then decode token by token.

The engine knows nothing of text: prompts are lists of ids, stop conditions are ids or a callback
verdict (stop strings are checked above, in `slmkit.generate`). Prompts of different lengths are
left-padded into one batch; padded slots are masked and RoPE positions count real tokens only,
so every row gets exactly what it would get alone.

For one prompt, the cache is kept between calls and the longest shared prefix is reused, so a
chat turn only prefills what is new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slmkit.compress.quant.fused import unfuse_shared_inputs
from slmkit.errors import SlmError
from slmkit.infer.sampling import SamplingParams, count_tokens, make_generator, sample
from slmkit.layers import prepare_for_cpu_inference
from slmkit.model import CausalLM, KVCache

# on_token(row, token_id) -> True to stop that row (e.g. a stop string appeared in its text).
TokenCallback = Callable[[int, int], bool | None]


@dataclass
class Generation:
    tokens: list[int]  # new tokens, without the prompt (a stop token that ended it is not included)
    finish_reason: str  # "stop" (stop token or callback) or "length"
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def default_cache_dtype(model: CausalLM) -> torch.dtype:
    """The weights' dtype, except fp32 for bf16 weights: on CPUs a bf16 model attends faster over an
    fp32 cache (there are no native bf16 attention kernels)."""
    weight_dtype = model.model.embed_tokens.weight.dtype
    return torch.float32 if weight_dtype == torch.bfloat16 else weight_dtype


class Engine:
    def __init__(self, model: CausalLM, max_seq_len: int | None = None, cache_dtype: torch.dtype | None = None,
                 compile: bool = False):
        """compile: run decode steps through `torch.compile` (fuses the many small per-layer ops that
        dominate batch-1 decoding on a CPU; costs about a minute of compilation on first use)."""
        self.model = prepare_for_cpu_inference(model.eval())
        self.decode_step = self.model
        if compile:
            unfuse_shared_inputs(self.model)  # the compiler fuses; the eager identity cache would only cost guards
            self.decode_step = torch.compile(self.model, dynamic=True)
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings,
                               model.config.max_position_embeddings)
        self.cache_dtype = cache_dtype or default_cache_dtype(model)
        self.cache: KVCache | None = None
        self.cached_tokens: list[int] = []  # what the cache holds, for batch-1 prefix reuse

    def reset(self) -> None:
        """Forget what the cache holds (the next prompt is prefilled from scratch)."""
        self.cached_tokens = []

    # -- checks and setup -----------------------------------------------------------------------

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise SlmError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise SlmError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len} "
                           "(and needs room for one new token); shorten it or ask for truncation")
        vocab = self.model.config.vocab_size
        if max(prompt) >= vocab or min(prompt) < 0:
            raise SlmError(f"token ids must be in [0, {vocab}); got {min(prompt)}..{max(prompt)}")

    def _cache_for(self, batch: int, needed: int) -> KVCache:
        """Reuse the cache when it fits; otherwise allocate, rounded up to 256 slots to reuse later."""
        cache = self.cache
        if cache is None or cache.batch != batch or cache.max_len < needed:
            size = min(self.max_seq_len, -(-needed // 256) * 256)
            cache = self.model.new_cache(batch, size, self.cache_dtype)
            self.cache, self.cached_tokens = cache, []
        return cache

    # -- generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_token: TokenCallback | None = None) -> list[Generation]:
        for p in prompts:
            self.check_prompt(p)
        params.check_vocab(self.model.config.vocab_size)
        longest = max(len(p) for p in prompts)
        # Left padding puts every row's end at slot `longest`, so the context bounds all rows alike.
        budget = min(params.max_new_tokens, self.max_seq_len - longest)
        cache = self._cache_for(len(prompts), longest + budget)
        start = time.perf_counter()
        logits, positions = self._prefill(cache, prompts)
        prefill_s = time.perf_counter() - start
        out = self._decode(cache, prompts, logits, positions, budget, params, on_token)
        decode_s = time.perf_counter() - start - prefill_s
        for g in out:
            g.prefill_seconds, g.decode_seconds = prefill_s, decode_s
        return out

    def _prefill(self, cache: KVCache, prompts: list[list[int]]):
        """Run the prompts; returns last-position logits (B, V) and next RoPE positions (B,)."""
        if len(prompts) == 1:
            return self._prefill_one(cache, prompts[0])
        device = cache.keys[0].device
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        valid = torch.zeros(len(prompts), cache.max_len, dtype=torch.bool)
        for row, p in enumerate(prompts):  # left padding: real tokens end at the same slot
            ids[row, longest - len(p):] = torch.tensor(p)
            valid[row, longest - len(p):] = True
        positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)  # (B, T) real-token count
        cache.length, cache.key_valid = 0, valid.to(device) if any(len(p) < longest for p in prompts) else None
        self.cached_tokens = []
        logits = self.model(ids.to(device), cache=cache, positions=positions.to(device), logits_to_keep=1)
        return logits[:, -1], positions[:, -1].to(device) + 1

    def _prefill_one(self, cache: KVCache, prompt: list[int]):
        """Batch of one: keep the longest prefix the cache already holds, run only the rest."""
        common = 0
        for a, b in zip(self.cached_tokens, prompt[:-1]):  # the last token always runs, for its logits
            if a != b:
                break
            common += 1
        cache.length, cache.key_valid = common, None
        device = cache.keys[0].device
        ids = torch.tensor([prompt[common:]], device=device)
        logits = self.model(ids, cache=cache, logits_to_keep=1)
        self.cached_tokens = list(prompt)
        return logits[:, -1], torch.tensor([len(prompt)], device=device)

    def _decode(self, cache, prompts, logits, positions, budget, params, on_token) -> list[Generation]:
        batch = len(prompts)
        generator = make_generator(params.seed)
        stops = set(params.stop_token_ids)
        history = self._history(prompts, logits.device) if params.repetition_penalty != 1.0 else None
        counts = torch.zeros_like(logits, dtype=torch.float32) if params.penalizes_counts else None  # (B, V)
        results = [Generation([], "length", len(p)) for p in prompts]
        done = [False] * batch
        while True:
            token = sample(logits, params, generator, history, counts)  # (B,)
            counts = count_tokens(counts, token)
            for row, tok in enumerate(token.tolist()):
                if not done[row]:
                    done[row] = self._accept(results[row], row, tok, stops, budget, on_token)
            if all(done):
                break
            if history is not None:
                history = torch.cat([history, token[:, None]], dim=1)
            if cache.key_valid is not None:
                cache.key_valid[:, cache.length] = True
            step = self.decode_step(token[:, None], cache=cache, positions=positions[:, None])  # (B, 1, V)
            logits, positions = step[:, -1], positions + 1
            if batch == 1:
                self.cached_tokens.append(results[0].tokens[-1])
        return results

    @staticmethod
    def _accept(result: Generation, row: int, tok: int, stops: set[int], budget: int, on_token) -> bool:
        """Record a sampled token; True when the row is finished."""
        if tok in stops:
            result.finish_reason = "stop"
            return True
        result.tokens.append(tok)
        if on_token is not None and on_token(row, tok):
            result.finish_reason = "stop"
            return True
        return len(result.tokens) >= budget

    @staticmethod
    def _history(prompts: list[list[int]], device) -> torch.Tensor:
        """(B, L) ids seen so far; short rows are padded with their own first token (a no-op for
        the repetition penalty, which only asks whether a token occurred)."""
        longest = max(len(p) for p in prompts)
        rows = [[p[0]] * (longest - len(p)) + list(p) for p in prompts]
        return torch.tensor(rows, device=device)

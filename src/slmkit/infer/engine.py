"""Generation on token ids: prefill the prompt into a static KV cache, then decode token by token.

The engine knows nothing of text: prompts are lists of ids, stop conditions are ids or a callback
verdict (stop strings are checked above, in `slmkit.generate`). Prompts of different lengths are
left-padded into one batch; padded slots are masked and RoPE positions count real tokens only,
so every row gets exactly what it would get alone.

For one prompt, the cache is kept between calls and the longest shared prefix is reused, so a
chat turn only prefills what is new. A single prompt may also be decoded speculatively: a drafter
(`slmkit.infer.speculate`) guesses the next tokens, one forward pass verifies them all, and the
text is the one plain decoding would give.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slmkit.compress.quant.fused import unfuse_shared_inputs
from slmkit.errors import SlmError
from slmkit.infer.constrain import TokenMatcher
from slmkit.infer.sampling import SamplingParams, TokenChooser
from slmkit.infer.speculate import Drafter
from slmkit.layers import prepare_for_cpu_inference
from slmkit.model import CausalLM, KVCache

# on_token(row, token_id) -> True to stop that row (e.g. a stop string appeared in its text).
TokenCallback = Callable[[int, int], bool | None]
# Inductor settings for the decode step. freezing: weights become constants of the graph (folded and
# laid out once); cpp_wrapper: the graph's kernels are called from generated C++ instead of Python,
# which removes most per-step overhead at batch 1. Measured on SmolLM2 int4 (2 threads, one run,
# median of 3): 37.7 tok/s against 33.8 without them = 0.54x vs 0.48x llama.cpp Q4_0 (69.8), for a
# longer first compilation (322 s against 177 s cold; 114 s against 75 s with inductor's cache).
COMPILE_OPTIONS = {"freezing": True, "cpp_wrapper": True}
# step([(row, token, RoPE position), ...]) -> those rows' next-token logits (n, V): one forward pass.
StepFn = Callable[[list[tuple[int, int, int]]], torch.Tensor]


@dataclass
class Generation:
    tokens: list[int]  # new tokens, without the prompt (a stop token that ended it is not included)
    finish_reason: str  # "stop" (stop token or callback) or "length"
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    drafted: int = 0  # speculative decoding: tokens the drafter proposed ...
    accepted: int = 0  # ... and how many of them the model kept

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def default_cache_dtype(model: CausalLM) -> torch.dtype:
    """The weights' dtype, except fp32 for bf16 weights: on CPUs a bf16 model attends faster over an
    fp32 cache (there are no native bf16 attention kernels)."""
    return torch.float32 if model.dtype == torch.bfloat16 else model.dtype


class Engine:
    def __init__(self, model: CausalLM, max_seq_len: int | None = None, cache_dtype: torch.dtype | None = None,
                 compile: bool = False, drafter: Drafter | None = None, draft_tokens: int = 4):
        """compile: run decode steps through `torch.compile` (fuses the many small per-layer ops that
        dominate batch-1 decoding on a CPU; costs minutes of compilation on first use, see COMPILE_OPTIONS).
        drafter: decode single prompts speculatively, verifying up to `draft_tokens` guesses per pass."""
        self.model = prepare_for_cpu_inference(model.eval())
        self.decode_step = self.model
        if compile:
            unfuse_shared_inputs(self.model)  # the compiler fuses; the eager identity cache would only cost guards
            self.decode_step = torch.compile(self.model, dynamic=True, options=COMPILE_OPTIONS)
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings,
                               model.config.max_position_embeddings)
        self.cache_dtype = cache_dtype or default_cache_dtype(model)
        self.cache: KVCache | None = None
        self.cached_tokens: list[int] = []  # what the cache holds, for batch-1 prefix reuse
        self.drafter, self.draft_tokens = drafter, draft_tokens

    @property
    def config(self):
        return self.model.config

    def reset(self) -> None:
        """Forget what the cache holds (the next prompt is prefilled from scratch)."""
        self.cached_tokens = []

    # -- checks and setup -----------------------------------------------------------------------

    def check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.max_seq_len, self.model.config.vocab_size)

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
                 on_token: TokenCallback | None = None,
                 matchers: list[TokenMatcher] | None = None) -> list[Generation]:
        """matchers: one per prompt, to keep each row's text inside a grammar (structured output)."""
        if matchers is not None and len(matchers) != len(prompts):
            raise SlmError(f"{len(matchers)} output matchers for {len(prompts)} prompts; give one per prompt")
        for p in prompts:
            self.check_prompt(p)
        params.check_vocab(self.model.config.vocab_size)
        longest = max(len(p) for p in prompts)
        # Left padding puts every row's end at slot `longest`, so the context bounds all rows alike.
        budget = min(params.max_new_tokens, self.max_seq_len - longest)
        cache = self._cache_for(len(prompts), longest + budget)
        start = time.perf_counter()
        logits = self._prefill(cache, prompts)
        prefill_s = time.perf_counter() - start
        if self.drafter is not None and len(prompts) == 1 and matchers is None:
            out = [self._speculate(cache, prompts[0], logits, budget, params, on_token)]
        else:
            out = decode_rows(prompts, logits, params, budget, on_token, self._stepper(cache, len(prompts)), matchers)
        decode_s = time.perf_counter() - start - prefill_s
        for g in out:
            g.prefill_seconds, g.decode_seconds = prefill_s, decode_s
        return out

    def _prefill(self, cache: KVCache, prompts: list[list[int]]):
        """Run the prompts; returns their last positions' logits (B, V)."""
        if len(prompts) == 1:
            return self._prefill_one(cache, prompts[0])
        device = cache.keys[0].device
        longest = max(len(p) for p in prompts)
        ids, valid, positions = left_padded(prompts, cache.max_len)
        cache.restart(valid.to(device) if any(len(p) < longest for p in prompts) else None)
        self.cached_tokens = []
        logits = self.model(ids.to(device), cache=cache, positions=positions.to(device), logits_to_keep=1)
        return logits[:, -1]

    def _prefill_one(self, cache: KVCache, prompt: list[int]):
        """Batch of one: keep the longest prefix the cache already holds, run only the rest."""
        common = shared_prefix(self.cached_tokens, prompt)
        cache.restart()
        cache.rewind(common)
        device = cache.keys[0].device
        ids = torch.tensor([prompt[common:]], device=device)
        logits = self.model(ids, cache=cache, logits_to_keep=1)
        self.cached_tokens = list(prompt)
        return logits[:, -1]

    def _stepper(self, cache: KVCache, batch: int) -> StepFn:
        """`decode_rows`'s step on this model: every row of the cache runs (a finished row repeats
        its last token; its output is dropped), and the rows asked for get their logits."""
        device = cache.keys[0].device
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1) each row's latest token
        positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1) its RoPE position

        def step(feed: list[tuple[int, int, int]]) -> torch.Tensor:
            for row, tok, pos in feed:
                tokens[row, 0], positions[row, 0] = tok, pos
            cache.open_slot()
            logits = self.decode_step(tokens, cache=cache, positions=positions)[:, -1]  # (B, V)
            if batch == 1:
                self.cached_tokens.append(feed[0][1])
            return logits[[row for row, _, _ in feed]]

        return step

    def _speculate(self, cache, prompt, logits, budget, params, on_token) -> Generation:
        """Batch-1 decoding that feeds [last token, guesses...] in one pass and keeps the guesses the
        model itself picks (each position sampled exactly as `decode_rows` would, see `speculate`)."""
        result = Generation([], "length", len(prompt))
        chooser = TokenChooser(params, [prompt], logits.shape[-1])
        stops = chooser.stops
        seen = list(prompt)  # prompt + chosen tokens (what the drafter continues)

        def choose(row_logits: torch.Tensor) -> int:  # row_logits (1, V)
            seen.append(chooser.choose(row_logits)[0])
            return seen[-1]

        token = choose(logits)
        while not accept_token(result, 0, token, stops, budget, on_token):
            room = min(budget - len(result.tokens), cache.max_len - cache.length) - 1  # slots past `token`
            draft = self.drafter.propose(seen, min(self.draft_tokens, room))
            start = cache.length
            out = self.decode_step(torch.tensor([[token, *draft]], device=logits.device), cache=cache)[0]  # (1+k, V)
            result.drafted += len(draft)
            kept, finished = 0, False
            for i, guess in enumerate(draft):
                token = choose(out[i:i + 1])
                if token != guess:
                    break
                kept += 1
                if accept_token(result, 0, guess, stops, budget, on_token):
                    finished = True
                    break
            else:
                token = choose(out[len(draft):])  # every guess kept: the pass also gives the next token
            result.accepted += kept
            cache.rewind(start + 1 + kept)  # forget the slots of rejected guesses
            if finished:
                break
        self.cached_tokens = seen[:cache.length]
        return result


def decode_rows(prompts: list[list[int]], logits: torch.Tensor, params: SamplingParams, budget: int,
                on_token: TokenCallback | None, step: StepFn, matchers: list | None = None) -> list[Generation]:
    """The decode loop of every engine: choose each live row's token from its logits (B, V) after the
    prefill, record it (stop token, budget, callback), and feed the rows that go on through `step`,
    each at its own RoPE position (prompt tokens + tokens so far - 1)."""
    chooser = TokenChooser(params, prompts, logits.shape[-1], matchers)
    results = [Generation([], "length", len(p)) for p in prompts]
    live = list(range(len(prompts)))  # rows still generating, in the order of `logits`
    while live:
        feed = []
        for row, tok in zip(live, chooser.choose(logits, live)):
            if not accept_token(results[row], row, tok, chooser.stops, budget, on_token):
                feed.append((row, tok, len(prompts[row]) + len(results[row].tokens) - 1))
        live = [row for row, _, _ in feed]
        if live:
            logits = step(feed)
    return results


def accept_token(result: Generation, row: int, tok: int, stops: set[int], budget: int, on_token) -> bool:
    """Record a sampled token in `result`; True when the row is finished."""
    if tok in stops:
        result.finish_reason = "stop"
        return True
    result.tokens.append(tok)
    if on_token is not None and on_token(row, tok):
        result.finish_reason = "stop"
        return True
    return len(result.tokens) >= budget


def check_prompt(prompt: list[int], context: int, vocab_size: int) -> None:
    """A one-line SlmError when token ids cannot be a prompt for this model and context."""
    if not prompt:
        raise SlmError("the prompt is empty; give at least one token")
    if len(prompt) >= context:
        raise SlmError(f"the prompt has {len(prompt)} tokens but the context holds {context} "
                       "(and needs room for one new token); shorten it or ask for truncation")
    if max(prompt) >= vocab_size or min(prompt) < 0:
        raise SlmError(f"token ids must be in [0, {vocab_size}); got {min(prompt)}..{max(prompt)}")


def left_padded(prompts: list[list[int]], slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded so every row's last token sits in the last column: ids (B, T), valid (B,
    slots) marking real tokens among the first T slots, and RoPE positions (B, T) counting each
    row's own tokens (padding gets 0)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), slots, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        valid[row, longest - len(p):longest] = True
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions


def shared_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` a cache holding `cached` can keep (never the last one,
    which must run again for its logits)."""
    common = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        common += 1
    return common

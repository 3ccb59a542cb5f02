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
from slmkit.infer.sampling import SamplingParams, count_tokens, make_generator, sample
from slmkit.infer.speculate import Drafter
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
    drafted: int = 0  # speculative decoding: tokens the drafter proposed ...
    accepted: int = 0  # ... and how many of them the model kept

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
                 compile: bool = False, drafter: Drafter | None = None, draft_tokens: int = 4):
        """compile: run decode steps through `torch.compile` (fuses the many small per-layer ops that
        dominate batch-1 decoding on a CPU; costs about a minute of compilation on first use).
        drafter: decode single prompts speculatively, verifying up to `draft_tokens` guesses per pass."""
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
        logits, positions = self._prefill(cache, prompts)
        prefill_s = time.perf_counter() - start
        if self.drafter is not None and len(prompts) == 1 and matchers is None:
            out = [self._speculate(cache, prompts[0], logits, budget, params, on_token)]
        else:
            out = self._decode(cache, prompts, logits, positions, budget, params, on_token, matchers)
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
        ids, valid, positions = left_padded(prompts, cache.max_len)
        cache.length, cache.key_valid = 0, valid.to(device) if any(len(p) < longest for p in prompts) else None
        self.cached_tokens = []
        logits = self.model(ids.to(device), cache=cache, positions=positions.to(device), logits_to_keep=1)
        return logits[:, -1], positions[:, -1].to(device) + 1

    def _prefill_one(self, cache: KVCache, prompt: list[int]):
        """Batch of one: keep the longest prefix the cache already holds, run only the rest."""
        common = shared_prefix(self.cached_tokens, prompt)
        cache.length, cache.key_valid = common, None
        device = cache.keys[0].device
        ids = torch.tensor([prompt[common:]], device=device)
        logits = self.model(ids, cache=cache, logits_to_keep=1)
        self.cached_tokens = list(prompt)
        return logits[:, -1], torch.tensor([len(prompt)], device=device)

    def _decode(self, cache, prompts, logits, positions, budget, params, on_token, matchers) -> list[Generation]:
        batch = len(prompts)
        generator = make_generator(params.seed)
        stops = set(params.stop_token_ids)
        history = prompt_history(prompts, logits.device) if params.repetition_penalty != 1.0 else None
        counts = torch.zeros_like(logits, dtype=torch.float32) if params.penalizes_counts else None  # (B, V)
        results = [Generation([], "length", len(p)) for p in prompts]
        done = [False] * batch
        while True:
            allowed = torch.stack([m.allowed() for m in matchers]) if matchers else None  # (B, V)
            token = sample(logits, params, generator, history, counts, allowed)  # (B,)
            counts = count_tokens(counts, token)
            for row, tok in enumerate(token.tolist()):
                if not done[row]:
                    if matchers and tok not in stops:
                        matchers[row].advance(tok)
                    done[row] = accept_token(results[row], row, tok, stops, budget, on_token)
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

    def _speculate(self, cache, prompt, logits, budget, params, on_token) -> Generation:
        """Batch-1 decoding that feeds [last token, guesses...] in one pass and keeps the guesses the
        model itself picks (each position sampled exactly as `_decode` would, see `speculate`)."""
        result = Generation([], "length", len(prompt))
        generator, stops = make_generator(params.seed), set(params.stop_token_ids)
        seen = list(prompt)  # prompt + chosen tokens (the repetition penalty's history)
        counts = torch.zeros_like(logits, dtype=torch.float32) if params.penalizes_counts else None

        def choose(row_logits: torch.Tensor) -> int:  # row_logits (1, V)
            nonlocal counts
            history = torch.tensor([seen], device=row_logits.device) if params.repetition_penalty != 1.0 else None
            token = sample(row_logits, params, generator, history, counts)
            counts = count_tokens(counts, token)
            seen.append(int(token[0]))
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
            cache.length = start + 1 + kept  # forget the slots of rejected guesses
            if finished:
                break
        self.cached_tokens = seen[:cache.length]
        return result


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


def prompt_history(prompts: list[list[int]], device=None) -> torch.Tensor:
    """(B, L) ids seen so far; short rows are padded with their own first token (a no-op for
    the repetition penalty, which only asks whether a token occurred)."""
    longest = max(len(p) for p in prompts)
    rows = [[p[0]] * (longest - len(p)) + list(p) for p in prompts]
    return torch.tensor(rows, device=device)


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

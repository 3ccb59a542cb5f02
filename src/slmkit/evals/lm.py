"""What a task asks of a model: the log-likelihood of a continuation after a context, and greedy
generation until a stop string. `LocalLM` answers from an slmkit model, `LlamaCppLM` from its GGUF
export run by llama.cpp (`--engine llamacpp`), `evals.endpoint` from any OpenAI-compatible server.

Log-likelihoods follow lm-evaluation-harness: the context and continuation are tokenized
separately (the context's trailing spaces move onto the continuation), the context is cut from the
left so that it fits beside the continuation, and the continuation's tokens are scored. Unlike the
harness, the choices of a question do not each re-run their shared context: it runs once into a
KV cache (a 4-choice HellaSwag question costs about half as much).

Batch-size invariance: each row of a batch is right-padded, so no row sees another, and a
question's scores never depend on other questions. The BLAS kernels may still round a row
differently when the batch shape changes (last-bit differences), so scores are rounded to
`ROUND_NATS` before anyone compares them: the same documents get the same answers with
--batch-size 1 or 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from slmkit.errors import SlmError
from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams

ROUND_NATS = 1e-4


@dataclass
class LoglikelihoodRequest:
    context: str  # few-shot examples included
    continuation: str


def move_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    """"Answer: " + "Paris" is scored as "Answer:" + " Paris", as lm-evaluation-harness does."""
    spaces = len(context) - len(context.rstrip(" "))
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


@dataclass
class Score:
    logprob: float  # summed over the continuation's tokens, rounded to ROUND_NATS
    greedy: bool  # every continuation token is the model's argmax (LAMBADA's accuracy)
    tokens: int  # continuation tokens
    truncated: bool  # the context was cut from the left to fit the model


class ScoringLM:
    """lm-evaluation-harness's tokenization, grouping and truncation rules, over a runtime that
    gives log-probabilities at the last positions of a token sequence (`_tail_logprobs`) and
    scores a question's continuations after their shared context (`_score_fitted`)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and of the continuation, as lm-evaluation-harness splits them."""
        context, continuation = move_trailing_spaces(context, continuation)
        whole = self.tokenizer.encode(context + continuation, add_special=False)
        ctx = self.tokenizer.encode(context, add_special=False)
        return whole[: len(ctx)], whole[len(ctx):]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[LoglikelihoodRequest], progress: bool = True) -> list[Score]:
        """Requests that share a context (a question's choices) are scored together, so the runtime
        can run that context once."""
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}  # context ids -> its requests, in request order
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise SlmError(f"request {i} has an empty continuation: nothing to score")
            groups.setdefault(tuple(ctx), []).append(i)
        scores: list[Score | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="log-likelihoods", unit="req", disable=not progress, leave=False)
        for ctx, members in groups.items():
            for i, score in zip(members, self._score_group(list(ctx), [pairs[i][1] for i in members])):
                scores[i] = score
            bar.update(len(members))
        bar.close()
        return scores  # type: ignore[return-value]

    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[Score]:
        longest = max(len(c) for c in conts)
        room = self.max_length + 1 - longest  # context tokens that fit beside the longest continuation
        if room < 1:  # a continuation alone overflows the context: score each one alone, as the harness does
            return [self._score_alone(ctx, cont) for cont in conts]
        truncated = len(ctx) > room
        ctx = ctx[-room:] if truncated else ctx
        if not ctx:  # nothing to condition the first token on: lm-eval puts the BOS/EOS token there
            ctx = [self._prefix_token()]
        return self._score_fitted(ctx, conts, truncated)

    def _score_fitted(self, ctx: list[int], conts: list[list[int]], truncated: bool) -> list[Score]:
        """Each continuation after `ctx`, which fits beside the longest of them."""
        out = []
        for cont in conts:
            logprobs = self._tail_logprobs(ctx + cont[:-1], len(cont))  # (len(cont), V)
            out.append(_score(logprobs[0], logprobs[1:] if len(cont) > 1 else None, cont, truncated))
        return out

    def _tail_logprobs(self, tokens: list[int], n: int) -> torch.Tensor:
        """(n, V) float log-probabilities of the next token at the last n positions of `tokens`."""
        raise NotImplementedError

    def _score_alone(self, ctx: list[int], cont: list[int]) -> Score:
        """lm-evaluation-harness's rule: the last max_length + 1 tokens of context + continuation,
        of which the continuation's tokens that remain are scored."""
        whole = ([self._prefix_token()] + ctx + cont)[-(self.max_length + 1):]
        n = min(len(cont), len(whole) - 1)
        logprobs = self._tail_logprobs(whole[:-1], n)
        first, rest = logprobs[0], (logprobs[1:] if n > 1 else None)
        return _score(first, rest, whole[-n:], truncated=True)

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        return next((t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None), 0)

    def _text_generator(self):
        raise NotImplementedError

    generate_batch = 1  # prompts decoded together by generate_until

    @torch.inference_mode()
    def generate_until(self, prompts: list[str], until: list[str], max_new_tokens: int,
                       progress: bool = True) -> list[tuple[str, bool]]:
        """(greedy continuation cut at the first stop string, prompt truncated) for each prompt; a
        prompt longer than the context keeps its end.

        Prompts of similar length are decoded `generate_batch` at a time: a batch-1 decode step is
        bound by reading the weights, so 8 rows cost about what one does. Each row is masked from
        the others (`slmkit.infer.engine`), so its text is the one it gets alone, unless the BLAS
        kernels' last-bit rounding for another batch shape flips a near-tie between two tokens;
        batch size 1 decodes one at a time."""
        generator = self._text_generator()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(until))
        room = generator.context_length - min(max_new_tokens, generator.context_length - 1)
        lengths = [len(self.tokenizer.encode(p)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # little padding inside a batch
        texts: dict[int, str] = {}
        bar = tqdm(total=len(prompts), desc="generating", unit="doc", disable=not progress, leave=False)
        for start in range(0, len(order), self.generate_batch):
            chunk = order[start : start + self.generate_batch]
            done = generator.complete([prompts[i] for i in chunk], params, truncate=True)  # cut at the first stop string
            texts.update({i: c.text for i, c in zip(chunk, done)})
            bar.update(len(chunk))
        bar.close()
        return [(texts[i], lengths[i] > room) for i in range(len(prompts))]


class LocalLM(ScoringLM):
    """An slmkit model and its tokenizer, scored in batches of `batch_size` rows: a question's
    context runs once into a KV cache, and its continuations run together as rows over copies."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        super().__init__(tokenizer, min(max_length or model.config.max_position_embeddings,
                                        model.config.max_position_embeddings))
        self.model, self.batch_size = model.eval(), batch_size
        self.generate_batch = batch_size

    def _score_fitted(self, ctx: list[int], conts: list[list[int]], truncated: bool) -> list[Score]:
        longest = max(len(c) for c in conts)
        span = len(ctx) + longest - 1
        cache = self.model.new_cache(1, span)
        first = torch.log_softmax(self.model(torch.tensor([ctx]), cache=cache, logits_to_keep=1)[0, -1].float(), -1)
        rest: dict[int, torch.Tensor] = {}  # continuation index -> (len - 1, V) log-probs of its later tokens
        longer = [j for j, c in enumerate(conts) if len(c) > 1]
        for start in range(0, len(longer), self.batch_size):
            chunk = longer[start : start + self.batch_size]
            rows = [conts[j][:-1] for j in chunk]
            ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # right padding
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            logits = self.model(ids, cache=cache.repeated(len(rows), span))
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, T, V)
            rest.update({j: logprobs[r, : len(conts[j]) - 1] for r, j in enumerate(chunk)})
        return [_score(first, rest.get(j), cont, truncated) for j, cont in enumerate(conts)]

    def _tail_logprobs(self, tokens: list[int], n: int) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([tokens]), logits_to_keep=n)[0].float(), -1)

    def _text_generator(self):
        return TextGenerator(self.model, self.tokenizer, self.max_length)


class LlamaCppLM(ScoringLM):
    """A `LlamaCppEngine` (a GGUF export run by llama.cpp) and its tokenizer. Continuations are
    scored one by one; the engine keeps the shared context in its cache between them."""

    def __init__(self, engine, tokenizer):
        super().__init__(tokenizer, engine.max_seq_len)
        self.engine = engine

    def _tail_logprobs(self, tokens: list[int], n: int) -> torch.Tensor:
        return torch.log_softmax(self.engine.tail_logits(tokens, n).float(), -1)

    def _text_generator(self):
        return TextGenerator(None, self.tokenizer, engine=self.engine)


def _score(first: torch.Tensor, rest: torch.Tensor | None, cont: list[int], truncated: bool) -> Score:
    """A continuation's summed log-likelihood: its first token from the context's last position
    (`first`, (V,)), the others from its own row (`rest`, (len - 1, V))."""
    total = first[cont[0]].item()
    greedy = int(first.argmax()) == cont[0]
    if rest is not None:
        target = torch.tensor(cont[1:])
        total += rest.gather(-1, target[:, None]).sum().item()
        greedy = greedy and bool((rest.argmax(-1) == target).all())
    return Score(round(total / ROUND_NATS) * ROUND_NATS, greedy, len(cont), truncated)

"""Speculative decoding: the same text as plain decoding (greedy and seeded sampling), the target's
distribution when guesses are rejected, and the drafters themselves."""

from __future__ import annotations

import collections

import pytest
import torch

from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.infer.speculate import DraftModel, PromptLookup
from slmkit.load import random_model
from slmkit.presets import get_preset

# A prompt that repeats itself, so prompt lookup has something to propose.
PROMPT = [5, 17, 33, 2, 101, 7, 9, 5, 17, 33, 2, 101, 7, 9, 5, 17]


@pytest.fixture(scope="module")
def target():
    return random_model(get_preset("tiny").config, seed=0)


@pytest.fixture(scope="module")
def other():
    """Another random model of the same vocabulary: a draft that is often wrong."""
    return random_model(get_preset("tiny").config, seed=1)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.propose([1, 2, 3, 4, 5, 1, 2], 2) == [3, 4]  # no earlier [5, 1, 2]; [1, 2] matched
    assert lookup.propose([1, 2, 9, 1, 2, 8, 1, 2], 5) == [8, 1, 2]  # the latest match wins, never the tail
    assert lookup.propose([1, 2, 3], 4) == [] and lookup.propose([1, 2, 1], 0) == []


@pytest.mark.parametrize("params", [
    dict(),
    dict(temperature=1.0, top_k=40, seed=3),
    dict(temperature=0.8, top_p=0.9, seed=11, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
], ids=["greedy", "sampled", "penalized"])
def test_lookup_speculation_gives_plain_decodings_text(target, params):
    sampling = SamplingParams(max_new_tokens=40, **params)
    plain = Engine(target).generate([PROMPT], sampling)[0]
    fast = Engine(target, drafter=PromptLookup(min_ngram=1)).generate([PROMPT], sampling)[0]
    assert fast.tokens == plain.tokens and fast.finish_reason == plain.finish_reason
    assert fast.drafted > 0


def test_a_draft_model_gives_the_same_text_and_the_target_as_its_own_draft_is_always_right(target, other):
    sampling = SamplingParams(max_new_tokens=30)
    plain = Engine(target).generate([PROMPT], sampling)[0].tokens
    wrong = Engine(target, drafter=DraftModel(Engine(other)), draft_tokens=4).generate([PROMPT], sampling)[0]
    assert wrong.tokens == plain
    same = Engine(target, drafter=DraftModel(Engine(target)), draft_tokens=4).generate([PROMPT], sampling)[0]
    assert same.tokens == plain and same.accepted >= 0.95 * same.drafted > 0
    drafted = accepted = 0
    for seed in range(5):  # seeded sampling too: the draws happen in the same order
        sampled = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=3, seed=seed)
        spec = Engine(target, drafter=DraftModel(Engine(other)), draft_tokens=3).generate([PROMPT], sampled)[0]
        assert spec.tokens == Engine(target).generate([PROMPT], sampled)[0].tokens
        drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
    assert 0 < accepted < drafted  # guesses were both kept and rejected


@pytest.mark.slow  # kept out of `make test` for its 15-minute budget; `make bench` runs it
@torch.inference_mode()
def test_rejected_guesses_keep_the_targets_distribution(target, other):
    """Two sampled tokens from top-3 (9 outcomes): their frequencies under speculation with a draft
    that is often wrong match the target's exact joint probabilities."""
    k, runs = 3, 1500

    def top_k_probs(ids: list[int]) -> dict[int, float]:
        logits = target(torch.tensor([ids]))[0, -1].float()
        values, idx = logits.topk(k)
        return dict(zip(idx.tolist(), values.softmax(-1).tolist()))

    exact = {(a, b): pa * pb for a, pa in top_k_probs(PROMPT).items() for b, pb in top_k_probs(PROMPT + [a]).items()}
    engine = Engine(target, drafter=DraftModel(Engine(other)), draft_tokens=2)
    seen = collections.Counter()
    drafted = accepted = 0
    for seed in range(runs):
        # 3 tokens, so the second one is verified from a guess (a pass never drafts past the budget)
        g = engine.generate([PROMPT], SamplingParams(max_new_tokens=3, temperature=1.0, top_k=k, seed=seed))[0]
        seen[tuple(g.tokens[:2])] += 1
        drafted, accepted = drafted + g.drafted, accepted + g.accepted
    assert 0 < accepted < drafted  # both paths were exercised
    total_variation = 0.5 * sum(abs(seen[pair] / runs - p) for pair, p in exact.items())
    assert set(seen) <= set(exact) and total_variation < 0.05, (total_variation, seen, exact)

"""The generation engine: determinism, seeds, batching with padding, prefix reuse, limits; sampling."""

from __future__ import annotations

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams, make_generator, sample, top_k_filter, top_p_filter


def _manual_greedy(model, prompt, n):
    """Greedy continuation by repeated full forward passes (no cache): the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_forward_reference(tiny_model):
    prompt = [5, 17, 33, 2, 101]
    out = Engine(tiny_model).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert out.tokens == _manual_greedy(tiny_model, prompt, 12)
    assert out.finish_reason == "length" and out.prompt_tokens == 5


def test_greedy_is_deterministic(tiny_model):
    engine = Engine(tiny_model)
    runs = [engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16))[0].tokens for _ in range(2)]
    assert runs[0] == runs[1]


def test_seed_reproduces_sampling(tiny_model):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    engine = Engine(tiny_model)
    a = engine.generate([[1, 2, 3]], params)[0].tokens
    b = Engine(tiny_model).generate([[1, 2, 3]], params)[0].tokens
    c = engine.generate([[1, 2, 3]], SamplingParams(**{**params.__dict__, "seed": 7}))[0].tokens
    assert a == b and a != c


def test_batched_prompts_of_different_lengths_match_single_runs(tiny_model):
    prompts = [[7, 8, 9, 10, 11, 12, 13], [4], [100, 200, 300]]
    params = SamplingParams(max_new_tokens=10)
    batched = Engine(tiny_model).generate(prompts, params)
    for prompt, got in zip(prompts, batched):
        assert got.tokens == Engine(tiny_model).generate([prompt], params)[0].tokens


def test_prefix_reuse_gives_the_same_tokens(tiny_model):
    engine = Engine(tiny_model)
    params = SamplingParams(max_new_tokens=8)
    first = engine.generate([[1, 2, 3, 4]], params)[0]
    follow_up = [1, 2, 3, 4, *first.tokens, 9, 10]
    reused = engine.generate([follow_up], params)[0].tokens
    assert reused == Engine(tiny_model).generate([follow_up], params)[0].tokens
    assert reused == _manual_greedy(tiny_model, follow_up, 8)


def test_stop_tokens_and_callback_stop(tiny_model):
    engine = Engine(tiny_model)
    free = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10))[0].tokens
    stopped = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, stop_token_ids=[free[3]]))[0]
    assert stopped.tokens == free[:free.index(free[3])] and stopped.finish_reason == "stop"
    seen = []
    by_callback = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10),
                                  on_token=lambda row, tok: seen.append(tok) or len(seen) == 2)[0]
    assert by_callback.tokens == free[:2] == seen and by_callback.finish_reason == "stop"


def test_generation_stops_at_the_context_end(tiny_model):
    engine = Engine(tiny_model, max_seq_len=16)
    out = engine.generate([list(range(1, 11))], SamplingParams(max_new_tokens=100))[0]
    assert len(out.tokens) == 6 and out.finish_reason == "length"


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    with pytest.raises(SlmError, match="prompt has 20 tokens but the context holds 16"):
        Engine(tiny_model, max_seq_len=16).generate([list(range(20))], SamplingParams())
    with pytest.raises(SlmError, match="token ids must be in"):
        Engine(tiny_model).generate([[1, 99999]], SamplingParams())


def test_bf16_model_decodes_like_its_full_forward(tiny_model):
    model = tiny_model.to(torch.bfloat16)
    prompt = [3, 1, 4, 1, 5, 9]
    engine = Engine(model)
    assert engine.cache_dtype == torch.float32
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6))[0].tokens
    assert len(out) == 6


# -- sampling ---------------------------------------------------------------------------------


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False, False] and probs[0] < 0.8 <= probs[:2].sum()
    assert torch.isfinite(top_p_filter(logits, 0.1))[0].tolist() == [True, False, False, False, False]


def test_sampling_matches_transformers_processors():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    history = torch.randint(0, 50, (3, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(history, expected)
    from slmkit.infer.sampling import apply_repetition_penalty

    ours = top_p_filter(top_k_filter(apply_repetition_penalty(logits, history, 1.3) / 0.7, 10), 0.8)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[torch.isfinite(ours)], expected[torch.isfinite(expected)])


def test_sample_greedy_and_seeded_draws():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample(logits, SamplingParams()).item() == 1
    params = SamplingParams(temperature=1.0)
    draws = [sample(logits.repeat(100, 1), params, make_generator(5)).tolist() for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def _penalized_greedy(model, prompt, n, frequency, presence, bias, repetition=1.0):
    """Greedy by full forward passes with OpenAI's penalties and bias and transformers' repetition
    penalty written out per step: the reference for the engine and the server's scheduler."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            for t in set(ids):
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(out):
                logits[t] -= out.count(t) * frequency + presence
            for t, b in bias.items():
                logits[t] += b
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


PENALIZED = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={3: 4.0, 9: -100.0},
                 repetition_penalty=1.2)


def test_penalties_and_logit_bias_follow_openai_and_match_a_full_forward_loop(tiny_model):
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={4: 1.0})
    from slmkit.infer.sampling import apply_count_penalties, apply_logit_bias

    torch.testing.assert_close(apply_logit_bias(apply_count_penalties(logits, counts, 0.5, 0.25), {4: 1.0}),
                               torch.tensor([[0.0, -1.25, -0.75, 0.0, 1.0]]))
    assert sample(logits, params, counts=counts).item() == 4
    prompt = [5, 17, 33, 2, 101]
    plain = Engine(tiny_model).generate([prompt], SamplingParams(max_new_tokens=16))[0].tokens
    params = SamplingParams(max_new_tokens=16, **PENALIZED)
    got = Engine(tiny_model).generate([prompt], params)[0].tokens
    reference = _penalized_greedy(tiny_model, prompt, 16, 1.5, 0.5, {3: 4.0, 9: -100.0}, 1.2)
    assert got == reference and got != plain and 9 not in got
    forced = Engine(tiny_model).generate([prompt], SamplingParams(max_new_tokens=5, logit_bias={42: 100.0}))[0]
    assert forced.tokens == [42] * 5
    with pytest.raises(SlmError, match="vocabulary"):
        Engine(tiny_model).generate([prompt], SamplingParams(logit_bias={10**6: 1.0}))


def test_invalid_sampling_params():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-2),
                dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(logit_bias={1: 101.0})):
        with pytest.raises(SlmError):
            SamplingParams(**bad)

"""What saves work under load: the prefix cache (on both engines), chunked prefill on llama.cpp, and
prompt-lookup speculation when one request decodes alone — each must leave the answers as they were."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import LLAMA_CPP_MISSING

from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.infer.speculate import PromptLookup
from slmkit.serve import scheduler as scheduler_module
from slmkit.serve.prefix import MIN_REUSE, PrefixCache
from slmkit.serve.scheduler import Job, Scheduler


class Tok:  # token ids in, their numbers out: the scheduler's text stream needs only decode
    eos_token_id = None

    def decode(self, ids, skip_special=True):
        return "".join(f"<{i}>" for i in ids)


def run_one(scheduler: Scheduler, prompt: list[int], params: SamplingParams) -> list[int]:
    """Submit one job, wait for it to end, return its tokens."""
    got, done = [], threading.Event()

    def emit(event):
        got.extend(t.token for t in event.tokens)
        assert event.kind != "error", event.message
        if event.kind == "done":
            done.set()

    scheduler.submit([Job(prompt, params.max_new_tokens, params, emit, top_logprobs=0)])
    assert done.wait(120)
    return got


# -- the cache itself --------------------------------------------------------------------------------


def test_lookup_finds_the_longest_shared_prefix_and_never_the_last_token():
    cache = PrefixCache(10_000)
    cache.store(list(range(10)), "ten", 100)
    cache.store([0, 1, 2, 3, 4, 50, 51], "five", 100)
    hit = cache.lookup(list(range(8)) + [99])
    assert hit.entry.state == "ten" and hit.tokens == 8
    assert cache.lookup(list(range(10))).tokens == 9  # the whole prompt is cached, but its last token must run
    assert cache.lookup([0, 1, 2, 9]) is None  # under MIN_REUSE shared tokens: recomputing is cheaper
    assert MIN_REUSE == 4 and cache.lookup([7, 7, 7, 7, 7]) is None
    assert (cache.lookups, cache.hits, cache.reused_tokens) == (4, 2, 17)


def test_a_longer_prompt_replaces_the_entry_it_extends_and_the_budget_evicts_least_recently_used():
    cache = PrefixCache(250)
    cache.store([1, 2, 3, 4, 5], "short", 100)
    cache.store([1, 2, 3, 4, 5, 6, 7], "longer", 100)  # covers the first
    assert list(cache.entries) == [(1, 2, 3, 4, 5, 6, 7)] and cache.bytes == 100
    assert cache.covers([1, 2, 3, 4]) and not cache.covers([1, 2, 3, 9])
    cache.store([20, 21, 22, 23, 24], "b", 100)
    cache.lookup([1, 2, 3, 4, 5, 6, 8])  # touches the first entry: "b" is now the least recently used
    cache.store([30, 31, 32, 33, 34], "c", 100)
    assert [e.state for e in cache.entries.values()] == ["longer", "c"]
    assert cache.evictions == 1 and cache.bytes == 200
    cache.store(list(range(100)), "too big", 1000)  # larger than the whole budget: not kept
    assert cache.bytes == 200


# -- torch runner --------------------------------------------------------------------------------------


SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]


def test_prompts_that_share_a_prefix_reuse_it_and_answer_as_without_the_cache(tiny_model):
    """fp32: a prompt read from a cached prefix gives the tokens a whole prefill gives (greedy and seeded)."""
    prompts = [SYSTEM + [40, 41, 42], SYSTEM + [50, 51], SYSTEM + [40, 41, 42, 43, 44], [60, 61, 62, 63, 64, 65]]
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=10, temperature=0.9, seed=3),
              SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=6)]
    expected = [Engine(tiny_model).generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    scheduler = Scheduler(tiny_model, Tok(), max_batch=4, lookup_tokens=0)
    try:
        got = [run_one(scheduler, p, sp) for p, sp in zip(prompts, params)]
    finally:
        scheduler.close()
    assert got == expected
    cache = scheduler.prefix
    assert cache.hits == 2  # the second and third prompts; the fourth shares nothing
    assert cache.reused_tokens == len(SYSTEM) + len(SYSTEM) + 3
    assert cache.lookups == 4 and cache.bytes > 0


def test_a_small_budget_evicts_and_zero_turns_the_cache_off(tiny_model):
    first = SYSTEM + [1, 2, 3]
    scheduler = Scheduler(tiny_model, Tok(), max_batch=2, lookup_tokens=0)
    try:
        run_one(scheduler, first, SamplingParams(max_new_tokens=2))
        per_token = scheduler.prefix.bytes / len(first)  # the snapshot's K and V bytes per cached token
    finally:
        scheduler.close()
    assert per_token > 0
    scheduler = Scheduler(tiny_model, Tok(), max_batch=2, prefix_cache_mb=0)
    try:
        run_one(scheduler, first, SamplingParams(max_new_tokens=2))
        assert scheduler.prefix is None
    finally:
        scheduler.close()
    room = len(first) * per_token * 1.5  # one prompt fits, two do not
    scheduler = Scheduler(tiny_model, Tok(), max_batch=2, prefix_cache_mb=room / 2**20, lookup_tokens=0)
    try:
        run_one(scheduler, first, SamplingParams(max_new_tokens=2))
        run_one(scheduler, [90 + i for i in range(len(first))], SamplingParams(max_new_tokens=2))
    finally:
        scheduler.close()
    assert scheduler.prefix.evictions == 1 and len(scheduler.prefix.entries) == 1
    assert scheduler.prefix.bytes <= scheduler.prefix.budget


def test_speculation_alone_gives_plain_decoding_text_and_guesses_are_kept(tiny_model):
    """A request decoding alone verifies prompt-lookup guesses; greedy and seeded text is unchanged."""
    prompt = [5, 17, 33, 2, 101, 7, 9] * 3  # a repetitive prompt, so lookup proposes guesses
    for params in (SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.7, seed=5),
                   SamplingParams(max_new_tokens=40, temperature=0.8, seed=11, repetition_penalty=1.3,
                                  frequency_penalty=0.5)):
        expected = Engine(tiny_model).generate([prompt], params)[0].tokens
        scheduler = Scheduler(tiny_model, Tok(), max_batch=2, prefix_cache_mb=0, lookup_tokens=4)
        scheduler.lookup = PromptLookup(min_ngram=1)  # a random model rarely repeats 2-grams of its prompt
        try:
            assert run_one(scheduler, prompt, params) == expected
        finally:
            scheduler.close()
        assert scheduler.drafted > 0
        assert scheduler.steps < len(expected) or scheduler.accepted == 0  # passes saved when guesses were kept
    assert scheduler.accepted <= scheduler.drafted


# -- llama.cpp runner ----------------------------------------------------------------------------------
# On a tiny random model with sharp logits, as an f32 GGUF: llama.cpp's kernels round differently for
# different batch shapes (reading a prompt in two pieces moves SmolLM2's logits by up to 0.01 in f32,
# 0.7 on its Q4_1 GGUF), so exact answers are compared where near-ties cannot flip.


@pytest.fixture(scope="module")
def llama_tiny(tmp_path_factory, tiny_tokenizer):
    llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
    if not llamacpp.available():
        pytest.skip(LLAMA_CPP_MISSING)
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import random_model
    from slmkit.presets import get_preset

    model = random_model(get_preset("tiny").config, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    gguf = write_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", "f32")
    return llamacpp, gguf, model.config


def llama_scheduler(llama_tiny, **options) -> Scheduler:
    from slmkit.serve.runners import LlamaCppRunner

    llamacpp, gguf, config = llama_tiny
    engine = llamacpp.LlamaCppEngine(gguf, config, 256, sequences=4)
    return Scheduler(LlamaCppRunner(engine), Tok(), max_batch=4, **options)


def test_a_restored_sequence_continues_exactly_as_the_one_it_was_saved_from(llama_tiny):
    from slmkit.serve.prefix import Entry, Hit
    from slmkit.serve.runners import LlamaCppRunner

    llamacpp, gguf, config = llama_tiny
    runner = LlamaCppRunner(llamacpp.LlamaCppEngine(gguf, config, 256, sequences=3))
    prefix, more = SYSTEM + [40, 41, 42], [50, 51, 52, 53]
    original = runner.open()
    runner.run([], [(original, prefix, 0, True)])
    state, nbytes = runner.snapshot(original)
    assert nbytes == len(state) > 0
    _, (kept,) = runner.run([], [(original, more, len(prefix), True)])
    restored = runner.open(Hit(len(prefix), Entry(tuple(prefix), state, nbytes)))
    assert restored != original
    _, (again,) = runner.run([], [(restored, more, len(prefix), True)])
    assert torch.equal(again, kept)
    trimmed = runner.open(Hit(len(SYSTEM), Entry(tuple(prefix), state, nbytes)))  # only the shared part
    _, (fresh,) = runner.run([], [(trimmed, [60, 61], len(SYSTEM), True)])
    whole = LlamaCppRunner(llamacpp.LlamaCppEngine(gguf, config, 256))
    seq = whole.open()
    whole.run([], [(seq, SYSTEM, 0, False)])
    _, (expected,) = whole.run([], [(seq, [60, 61], len(SYSTEM), True)])
    assert torch.allclose(fresh, expected, atol=1e-4)


def test_llama_cpp_reuses_a_shared_prefix_and_answers_as_without_the_cache(llama_tiny):
    prompts = [SYSTEM + [40, 41, 42], SYSTEM + [50, 51], SYSTEM + [40, 41, 42, 43, 44], [60, 61, 62, 63, 64, 65]]
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=10, temperature=0.9, seed=3),
              SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=6)]
    answers = {}
    for cache_mb in (0, 16):
        scheduler = llama_scheduler(llama_tiny, prefix_cache_mb=cache_mb, lookup_tokens=0)
        try:
            answers[cache_mb] = [run_one(scheduler, p, sp) for p, sp in zip(prompts, params)]
        finally:
            scheduler.close()
    assert answers[16] == answers[0]
    cache = scheduler.prefix
    assert cache.hits == 2 and cache.reused_tokens == len(SYSTEM) + len(SYSTEM) + 3


def test_llama_cpp_speculation_alone_keeps_the_text(llama_tiny):
    prompt = [5, 17, 33, 2, 101, 7, 9] * 3
    for params in (SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.7, seed=5)):
        answers, drafted = {}, 0
        for lookup in (0, 4):
            scheduler = llama_scheduler(llama_tiny, prefix_cache_mb=0, lookup_tokens=lookup)
            scheduler.lookup = PromptLookup(min_ngram=1)
            try:
                answers[lookup] = run_one(scheduler, prompt, params)
            finally:
                scheduler.close()
            drafted = scheduler.drafted
        assert answers[4] == answers[0] and drafted > 0


def test_llama_cpp_reads_a_long_prompt_in_pieces_while_another_request_streams(llama_tiny, monkeypatch):
    """A prompt of several pieces is read inside the running row's decode steps: the row keeps
    streaming before the long prompt's first token, and both answers equal their solo answers."""
    monkeypatch.setattr(scheduler_module, "PREFILL_CHUNK", 16)
    short, long = [5, 6, 7], [20 + i % 300 for i in range(150)]
    params = SamplingParams(max_new_tokens=60)
    scheduler = llama_scheduler(llama_tiny, prefix_cache_mb=0, lookup_tokens=0)
    try:
        solo = [run_one(scheduler, p, params) for p in (short, long)]
        order, got, done = [], {0: [], 1: []}, threading.Semaphore(0)

        def collect(i):
            def emit(event):
                assert event.kind != "error", event.message
                order.extend([i] * len(event.tokens))
                got[i].extend(t.token for t in event.tokens)
                if event.kind == "done":
                    done.release()
            return emit

        scheduler.submit([Job(short, 60, params, collect(0), top_logprobs=0)])
        while len(got[0]) < 3:  # the short request is streaming
            time.sleep(0.001)
        mark = len(order)
        scheduler.submit([Job(long, 60, params, collect(1), top_logprobs=0)])
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        scheduler.close()
    assert [got[0], got[1]] == solo
    while_reading = order[mark:order.index(1)].count(0)  # tokens streamed while the long prompt was read
    assert while_reading >= len(long) // 16 - 1


def test_metrics_count_prefix_hits_and_reused_tokens(tiny_model, tiny_tokenizer):
    pytest.importorskip("uvicorn")
    import httpx
    from serving import served

    from slmkit.serve.backend import LocalBackend

    backend = LocalBackend("tiny", tiny_model, tiny_tokenizer, max_batch=2)
    system = "Once upon a time there was a little robot who liked to count. " * 3
    with served({"tiny": backend}, timeout=60) as srv:
        for question in ("1, 2, 3?", "42?"):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
            assert r.status_code == 200, r.text
        text = httpx.get(srv.url + "/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("slmkit_") and '{model="tiny"}' in line}
    assert values["slmkit_prefix_cache_lookups_total"] == 2 and values["slmkit_prefix_cache_hits_total"] == 1
    assert values["slmkit_prefix_cache_reused_tokens_total"] >= len(tiny_tokenizer.encode(system))
    assert values["slmkit_prefix_cache_bytes"] > 0 and "slmkit_speculative_drafted_tokens_total" in values

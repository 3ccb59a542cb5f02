"""Structured output: sampled text always parses and validates, whatever the model (even a random one)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from slmkit.errors import SlmError
from slmkit.generate import TextGenerator
from slmkit.infer.constrain import Grammar, OutputFormat
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams

jsonschema = pytest.importorskip("jsonschema")

# Bounded so that even a random model ends inside the token budget (strings, numbers and arrays are capped).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
LABELS = ("positive", "negative", "neutral")


def sampled(seed: int, max_new_tokens: int = 200) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)


def test_random_model_samples_valid_json_under_a_schema(tiny_model, tiny_tokenizer):
    gen = TextGenerator(tiny_model, tiny_tokenizer)
    free = gen.complete(["Once upon a time"], sampled(0, 40))[0].text
    with pytest.raises(ValueError):  # the check below can fail: unconstrained, the model writes no JSON
        json.loads(free)
    fmt = OutputFormat("json_schema", schema=SCHEMA)
    for seed in range(10):
        out = gen.complete(["Once upon a time"], sampled(seed), output_format=fmt)[0]
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_mode_and_batched_rows(tiny_model, tiny_tokenizer):
    gen = TextGenerator(tiny_model, tiny_tokenizer)
    outs = gen.complete(["a", "Once upon a time there", "1, 2,"], sampled(3, 120),
                        output_format=OutputFormat("choices", choices=LABELS))
    assert [o.text in LABELS and o.finish_reason == "stop" for o in outs] == [True] * 3
    # Any JSON object is unbounded (a random model may write one string until the budget ends): every
    # answer must open an object, and every one that ended by itself must parse as one.
    objects = [gen.complete(["Once"], sampled(seed, 100), output_format=OutputFormat("json_object"))[0]
               for seed in range(5)]
    assert all(o.text.startswith("{") for o in objects)
    finished = [o for o in objects if o.finish_reason == "stop"]
    assert len(finished) >= 2 and all(isinstance(json.loads(o.text), dict) for o in finished)


def test_greedy_choice_is_the_labels_most_likely_first_token(smollm):
    """Under greedy decoding the mask only removes tokens: the answer starts with the most likely allowed token."""
    gen = TextGenerator(smollm.model, smollm.tokenizer)
    messages = [{"role": "user", "content": "Is this review positive or negative? 'The soup was cold and the "
                                            "waiter was rude.' Answer with one word."}]
    out = gen.chat(messages, SamplingParams(max_new_tokens=8), output_format=OutputFormat("choices", choices=LABELS))
    assert out.text == "negative"
    ok = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Describe a cat named Tom who is 3 years old as JSON with name and age."}]
    answer = gen.chat(ask, SamplingParams(max_new_tokens=40), output_format=OutputFormat("json_schema", schema=ok))
    assert json.loads(answer.text) == {"name": "Tom", "age": 3}


def test_scheduler_follows_the_grammar_like_the_engine(tiny_model, tiny_tokenizer):
    from slmkit.generate import stop_token_ids
    from slmkit.serve.scheduler import Job, Scheduler

    stops = stop_token_ids(tiny_model.config, tiny_tokenizer)
    grammar = Grammar(OutputFormat("json_schema", schema=SCHEMA), tiny_tokenizer, tiny_model.config.vocab_size, stops)
    prompt = tiny_tokenizer.encode("Once upon a time")
    params = SamplingParams(max_new_tokens=120, temperature=0.8, seed=7, stop_token_ids=stops)
    expected = Engine(tiny_model).generate([prompt], params, matchers=[grammar.matcher()])[0].tokens
    got, done = [], threading.Event()

    def emit(event):
        got.extend(t.token for t in event.tokens)
        if event.kind == "done":
            done.set()

    scheduler = Scheduler(tiny_model, tiny_tokenizer, max_batch=2, stop_ids=stops)
    try:
        scheduler.submit([Job(prompt, 120, params, emit, top_logprobs=0, matcher=grammar.matcher())])
        assert done.wait(60)
    finally:
        scheduler.close()
    assert got == expected
    jsonschema.validate(json.loads(tiny_tokenizer.decode(got)), SCHEMA)


@pytest.mark.parametrize("kind, fields, message", [
    ("xml", {}, "unknown output format"),
    ("json_schema", {"schema": None}, "needs the schema"),
    ("choices", {"choices": ()}, "at least one"),
    ("choices", {"choices": ("a", "")}, "non-empty"),
])
def test_bad_formats_are_refused_in_one_line(kind, fields, message):
    with pytest.raises(SlmError, match=message):
        OutputFormat(kind, **fields)


def test_a_schema_that_cannot_compile_is_refused_before_generation(tiny_model, tiny_tokenizer):
    fmt = OutputFormat("json_schema", schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(SlmError, match="cannot be compiled"):
        Grammar(fmt, tiny_tokenizer, tiny_model.config.vocab_size, [2])


def _looping_params(tokenizer, max_new_tokens: int) -> SamplingParams:
    """Greedy, with one token pushed so hard that the model writes it forever inside a string."""
    (token,) = tokenizer.encode("a", add_special=False)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, logit_bias={token: 100.0})


def test_a_looping_string_is_closed_and_the_json_ends(tiny_model, tiny_tokenizer):
    from slmkit.infer.constrain import TokenMatcher

    gen = TextGenerator(tiny_model, tiny_tokenizer)
    fmt = OutputFormat("json_object")
    grammar = gen.grammar(fmt, gen.stop_ids())
    unguarded = grammar.matcher()
    unguarded.guard = None  # the check below can fail: without the guard the string never closes
    prompt = tiny_tokenizer.encode("Once")
    params = _looping_params(tiny_tokenizer, 200)
    params = replace(params, stop_token_ids=gen.stop_ids())
    cut = gen.engine.generate([prompt], params, None, [unguarded])[0]
    assert isinstance(unguarded, TokenMatcher) and cut.finish_reason == "length"
    out = gen.complete(["Once"], _looping_params(tiny_tokenizer, 200), output_format=fmt)[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text
    assert "a" * 16 in out.text  # the model's own text is kept, up to where the loop was seen


def test_a_short_budget_closes_what_is_open_in_time(tiny_model, tiny_tokenizer):
    gen = TextGenerator(tiny_model, tiny_tokenizer)
    nested = {"type": "object", "properties": {"note": {"type": "object", "properties": {"text": {"type": "string"}},
                                                        "required": ["text"]}}, "required": ["note"]}
    for budget in (24, 32, 48):  # the schema forces `{"note": {"text": "` first: about 12 tokens here
        out = gen.complete(["Once"], _looping_params(tiny_tokenizer, budget),
                           output_format=OutputFormat("json_schema", schema=nested))[0]
        assert out.finish_reason == "stop" and len(out.tokens) <= budget, out.text
        jsonschema.validate(json.loads(out.text), nested)

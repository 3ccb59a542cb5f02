"""Fine-tuning data: answer-only loss masks, packing that keeps examples apart, splits, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.data.loader import Layout
from slmkit.data.sft import Example, encode, encode_all, fit, read_examples, split_rows
from slmkit.data.sft_batches import IGNORE, ExampleBatches, example_row
from slmkit.errors import SlmError
from slmkit.load import load_tokenizer, random_model
from slmkit.presets import get_preset


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer("smollm2-135m-instruct")


def _trained_text(tok, encoded) -> list[str]:
    """The trained tokens, decoded run by run (special tokens kept)."""
    runs, current = [], []
    for token, trained in zip(encoded.ids, encoded.trained):
        if trained:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special=False))
            current = []
    return runs + ([tok.decode(current, skip_special=False)] if current else [])


def test_a_single_turn_chat_trains_only_the_answer_and_its_end_of_turn(smol_tok):
    example = Example(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris."}])
    encoded = encode(example, smol_tok)
    assert _trained_text(smol_tok, encoded) == ["Paris.<|im_end|>"]
    assert smol_tok.decode(encoded.ids, skip_special=False) == smol_tok.apply_chat_template(
        example.messages, add_generation_prompt=False)


def test_a_multi_turn_chat_trains_every_assistant_turn_and_nothing_else(smol_tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Say 42."}, {"role": "assistant", "content": "42"}]
    encoded = encode(Example(messages=messages), smol_tok)
    assert _trained_text(smol_tok, encoded) == ["Hello! How can I help?<|im_end|>", "42<|im_end|>"]
    # the default system prompt SmolLM2's template adds, the user turns and the role headers are all context
    untrained = smol_tok.decode([t for t, k in zip(encoded.ids, encoded.trained) if not k], skip_special=False)
    assert "Say 42." in untrained and "SmolLM" in untrained and "<|im_start|>assistant\n" in untrained


def test_prompt_completion_trains_the_completion_and_an_end_token(smol_tok):
    encoded = encode(Example(prompt="Question: 2+2?\nAnswer:", completion=" 4"), smol_tok)
    assert encoded.ids[-1] == smol_tok.eos_token_id
    assert _trained_text(smol_tok, encoded) == [" 4" + smol_tok.token(smol_tok.eos_token_id)]


def test_text_trains_every_token(smol_tok):
    encoded = encode(Example(text="Once upon a time."), smol_tok)
    assert all(encoded.trained) and encoded.ids[-1] == smol_tok.eos_token_id


def test_an_overlong_example_loses_the_middle_of_its_input_not_its_answer(smol_tok):
    example = Example(messages=[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short answer"}])
    encoded = encode(example, smol_tok)
    cut = fit(encoded, 64, "truncate", "x")
    assert cut.truncated and len(cut.ids) == 64
    assert _trained_text(smol_tok, cut) == ["short answer<|im_end|>"]
    text = smol_tok.decode(cut.ids, skip_special=False)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\nshort answer" in text
    with pytest.raises(SlmError, match=r"x has \d+ tokens, more than the 64"):
        fit(encoded, 64, "error", "x")
    _, report = encode_all([example, Example(text="fine")], smol_tok, 64)
    assert report.truncated == 1 and report.examples == 2


def test_packed_examples_do_not_see_each_other(tiny_tokenizer):
    """Each example's logits in a packed row equal its logits alone: no attention across examples,
    positions restart at 0."""
    model = random_model(get_preset("tiny").config, seed=0).eval()
    examples = [Example(prompt=f"robot {i} counts:", completion=" 1, 2, 3" * (i + 1)) for i in range(6)]
    encoded, _ = encode_all(examples, tiny_tokenizer, 64)
    batches = ExampleBatches(encoded, 64, Layout(2, 1), seed=0, packing=True)
    assert batches.rows_per_epoch < len(encoded)  # several examples per row
    batch = batches.batch(0, 0)
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        for r, members in enumerate([batches.row(0), batches.row(1)]):
            start = 0
            for i in members:
                inputs, targets = example_row(encoded[i])
                alone = model(torch.tensor([inputs]))[0]
                torch.testing.assert_close(packed[r, start:start + len(inputs)], alone, atol=1e-5, rtol=1e-5)
                assert batch["targets"][r, start:start + len(inputs)].tolist() == targets
                start += len(inputs)


def test_batches_are_a_pure_function_of_seed_and_step(tiny_tokenizer):
    examples = [Example(prompt=f"n{i}", completion=" yes") for i in range(20)]
    encoded, _ = encode_all(examples, tiny_tokenizer, 32)
    one = ExampleBatches(encoded, 32, Layout(4, 2, world=2), seed=5)
    again = ExampleBatches(encoded, 32, Layout(4, 2, world=2), seed=5)
    assert all(torch.equal(one.batch(7, m, r)["input_ids"], again.batch(7, m, r)["input_ids"])
               for m in range(2) for r in range(2))
    epoch = [one.row(p)[0] for p in range(20)]
    assert sorted(epoch) == list(range(20))  # an epoch visits every example once
    assert (one.batch(0, 0)["targets"] == IGNORE).any()  # prompt tokens are not targets


def test_stratified_split_keeps_class_shares_and_refuses_one_class():
    labels = ["a"] * 80 + ["b"] * 20
    val, train = split_rows(100, (0.1,), seed=0, labels=labels)
    assert sorted(labels[i] for i in val) == ["a"] * 8 + ["b"] * 2 and len(train) == 90
    assert split_rows(100, (0.1,), 0, labels) == [val, train]  # fixed seed
    with pytest.raises(SlmError, match="one class only"):
        split_rows(10, (0.1,), 0, ["same"] * 10)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}]', r"data.jsonl:2 is not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"data.jsonl:2: the chat has no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"data.jsonl:2: message 0 must be"),
    ('{"prompt": "a", "completion": ""}', r"data.jsonl:2: 'completion' must be non-empty text"),
    ('{"question": "a"}', r"data.jsonl:2 has none of the known fields"),
])
def test_malformed_rows_are_named_by_file_and_line(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(SlmError, match=message):
        read_examples(path)


def test_rows_of_mixed_formats_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(SlmError, match="mixes formats"):
        read_examples(path)

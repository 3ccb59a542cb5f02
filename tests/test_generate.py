"""Text-level generation: streaming detokenization, stop strings, chat history, the chat REPL."""

from __future__ import annotations

import io

import pytest

from slmkit.chat import run_chat
from slmkit.errors import SlmError
from slmkit.generate import TextGenerator, TextStream
from slmkit.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def smol_gen(smollm):
    return TextGenerator(smollm.model, smollm.tokenizer)


def _stream(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, list(stop))
    pieces = [stream.push(t) for t in tokenizer.encode(text)]
    pieces.append(stream.finish())
    return stream, pieces


def test_stream_rebuilds_text_and_never_splits_a_character(smollm):
    text = "naïve café 🙂 東京 done"
    stream, pieces = _stream(smollm.tokenizer, text)
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed(smollm):
    stream, pieces = _stream(smollm.tokenizer, "alpha beta STOP gamma delta", stop=["STOP"])
    assert stream.text == "alpha beta " and stream.stopped
    assert "".join(pieces) == "alpha beta " and not any("ST" in p for p in pieces)


def test_smollm2_answers_a_factual_question(smol_gen):
    streamed = []
    result = smol_gen.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_new_tokens=20), on_text=lambda _r, t: streamed.append(t))
    assert "Paris" in result.text and "".join(streamed) == result.text
    assert result.finish_reason == "stop"  # ended by <|im_end|>, which is not part of the text


def test_stop_strings_end_generation(smol_gen):
    result = smol_gen.complete(["1, 2, 3, 4, 5,"], SamplingParams(max_new_tokens=30, stop=["8"]))[0]
    assert result.finish_reason == "stop" and "8" not in result.text and result.text.strip().startswith("6")


def test_too_long_prompt_errors_or_truncates_on_request(smollm):
    gen = TextGenerator(smollm.model, smollm.tokenizer, max_seq_len=64)
    long_prompt = "word " * 200
    with pytest.raises(SlmError, match="--truncate"):
        gen.complete([long_prompt], SamplingParams(max_new_tokens=8))
    result = gen.complete([long_prompt], SamplingParams(max_new_tokens=8), truncate=True)[0]
    assert result.prompt_tokens == 56


def test_fit_messages_drops_oldest_turns_but_keeps_system(smollm):
    gen = TextGenerator(smollm.model, smollm.tokenizer, max_seq_len=120)
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok " * 5}]
    messages.append({"role": "user", "content": "last"})
    kept, dropped = gen.fit_messages(messages, max_new_tokens=20)
    assert dropped > 0 and kept[0]["role"] == "system" and kept[-1]["content"] == "last"


def test_chat_repl_commands(smol_gen):
    lines = iter(["/system You answer in French.", "Hello!", "/reset", "/help", "/exit"])
    out = io.StringIO()
    status = run_chat(smol_gen, SamplingParams(max_new_tokens=8), None, read=lambda _p: next(lines), out=out)
    text = out.getvalue()
    assert status == 0
    assert "system message set" in text and "assistant> " in text and "tokens/s" in text
    assert "conversation reset" in text and "/system TEXT" in text

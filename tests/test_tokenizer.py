"""The GGUF-embedded tokenizer against transformers' GGUF loader, tokenizer.json round trips, chat templates."""

from __future__ import annotations

import pytest

from slmkit.tokenizer import CHATML_TEMPLATE, Tokenizer, infer_pre_name

VARIED = (
    "Hello, world! It's 2026-11-23 and π ≈ 3.14159; naïve café Straße, 東京 and Привет 🙂🚀.\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n\n"
    "\tTabs\t\tand    runs   of    spaces,\r\nwindows lines, 1234567890 and 1,000,000.00 $ €.\n"
    "   leading spaces, trailing spaces   \n\n\n<|im_start|>user\nspecial tokens<|im_end|>   "
)


def test_gguf_tokenizer_matches_transformers(smollm, hf_smollm):
    _, reference = hf_smollm
    ours = smollm.tokenizer
    assert ours.pre == "smollm"
    for text in (VARIED, *VARIED.split("\n")):
        assert ours.encode(text) == reference(text, add_special_tokens=True).input_ids, text
    ids = ours.encode(VARIED)
    assert ours.decode(ids, skip_special=False) == VARIED


def test_special_tokens_stay_whole(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("<|im_start|>assistant\nhi<|im_end|>")
    assert ids[0] == tok.backend.token_to_id("<|im_start|>") and ids[-1] == tok.eos_token_id == 2
    assert tok.decode(ids) == "assistant\nhi"


def test_tokenizer_json_round_trip(smollm, tmp_path):
    smollm.tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(VARIED) == smollm.tokenizer.encode(VARIED)
    assert (again.bos_token_id, again.eos_token_id, again.pre) == (1, 2, "smollm")
    assert again.chat_template == smollm.tokenizer.chat_template


def test_saved_tokenizer_loads_in_transformers(smollm, tmp_path):
    transformers = pytest.importorskip("transformers")
    smollm.tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(VARIED).input_ids == smollm.tokenizer.encode(VARIED)


def test_chat_template_matches_transformers(smollm, hf_smollm):
    _, reference = hf_smollm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for convo in (messages, messages[1:2]):
        ours = smollm.tokenizer.apply_chat_template(convo, add_generation_prompt=True)
        theirs = reference.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        assert ours == theirs
    # Without a system message SmolLM2's template inserts its default one.
    rendered = smollm.tokenizer.apply_chat_template(messages[1:2])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_default_template():
    from slmkit.tokenizer import render_template

    text = render_template(CHATML_TEMPLATE, [{"role": "user", "content": "x"}], True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_pre_tokenizer_names_are_recognised(smollm):
    assert infer_pre_name(smollm.tokenizer.backend) == "smollm"


def test_chat_templates_are_read_where_transformers_keeps_them(tmp_path, tiny_tokenizer):
    """chat_template.jinja (transformers >= 4.43), and a list of named templates (its `default`)."""
    import json

    from slmkit.tokenizer import Tokenizer

    tiny_tokenizer.save(tmp_path / "a")
    (tmp_path / "a" / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(tmp_path / "a").apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    tiny_tokenizer.save(tmp_path / "b")
    conf = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    conf["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(conf))
    assert Tokenizer.from_dir(tmp_path / "b").chat_template == "plain"

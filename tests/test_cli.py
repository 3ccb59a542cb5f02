"""The `slm` command line: outputs, one-line errors, conversions; memory-light loading."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from slmkit.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def slm(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True,
                          env=ENV, input=input_text, timeout=300)


def test_size_mistral_7b_4bit(capsys):
    assert main(["size", "mistral-7b", "--bits", "4", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "7,241,732,096" in out and "4.07 GB" in out
    assert "536.87 MB" in out  # KV cache: 32 layers x 2 x 8 x 128 x 4096 tokens x 2 bytes


def test_info_on_a_big_preset_reads_no_weights(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0  # 46.7B parameters: would need 187 GB if built
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "8 experts, top 2" in out


def test_presets_lists_every_family(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "openelm-270m" in out and "46.70B" in out


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = slm("generate", str(tmp_path / "missing.gguf"), "hi")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "not found" in missing.stderr
    (tmp_path / "bad.gguf").write_text("nope")
    bad = slm("info", str(tmp_path / "bad.gguf"))
    assert bad.returncode == 2 and "is not a GGUF file" in bad.stderr and "Traceback" not in bad.stderr
    unknown = slm("size", "smollm-135")
    assert unknown.returncode == 2 and "Did you mean" in unknown.stderr
    port = slm("serve", "--port", "99999")  # refused by argparse, before any model loads
    assert port.returncode == 2 and "outside 0..65535" in port.stderr and "Traceback" not in port.stderr
    (tmp_path / "taken.txt").write_text("keep me")
    taken = slm("convert", "tiny", str(tmp_path / "taken.txt"))
    assert taken.returncode == 2 and "existing file" in taken.stderr and "Traceback" not in taken.stderr
    assert taken.stderr.strip().count("\n") == 0 and (tmp_path / "taken.txt").read_text() == "keep me"
    schema = slm("generate", "smollm2-135m-instruct", "hi", "--json-schema", "{'type': 'object'}")  # before loading
    assert schema.returncode == 2 and "--json-schema is not valid JSON" in schema.stderr
    spec = slm("generate", "smollm2-135m-instruct", "hi", "--speculate", "ngram")
    assert spec.returncode == 2 and "give 'lookup' or 'draft=MODEL'" in spec.stderr
    both = slm("generate", "smollm2-135m-instruct", "hi", "--json", "--choices", "a,b")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_generate_info_and_convert_on_a_tiny_model(tmp_path, tiny_tokenizer):
    from slmkit.interop.hf import save_hf
    from slmkit.load import random_model
    from slmkit.presets import get_preset

    model = random_model(get_preset("tiny").config, seed=0)
    save_hf(model, tiny_tokenizer, tmp_path / "hf")
    out = slm("generate", str(tmp_path / "hf"), "Once upon a time", "--max-tokens", "5", "--dtype", "float32",
              "--engine", "torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and "tokens/s" in out.stderr
    llama = slm("generate", str(tmp_path / "hf"), "Once upon a time", "--max-tokens", "5", "--engine", "llamacpp")
    if importlib.util.find_spec("llama_cpp") is None:  # without the extra: a one-line refusal naming it
        assert llama.returncode == 2 and "pip install -e '.[llamacpp]'" in llama.stderr
    else:
        assert llama.returncode == 0 and "exporting" in llama.stderr and "tokens/s" in llama.stderr, llama.stderr
        assert llama.stdout.startswith("Once upon a time")
    compiled = slm("generate", str(tmp_path / "hf"), "hi", "--engine", "llamacpp", "--compile")
    assert compiled.returncode == 2 and "--compile is a torch-engine option" in compiled.stderr
    label = slm("generate", str(tmp_path / "hf"), "Is it good?", "--choices", "yes,no,maybe", "--temperature", "1",
                "--seed", "3", "--dtype", "float32")
    assert label.returncode == 0, label.stderr
    assert label.stdout.strip().removeprefix("Is it good?") in ("yes", "no", "maybe")
    other = tmp_path / "other-tokenizer"
    save_hf(model, tiny_tokenizer, other)
    conf = json.loads((other / "tokenizer.json").read_text())
    conf["model"]["vocab"] = {f"x{t}": i for t, i in conf["model"]["vocab"].items()}  # same ids, other strings
    conf["model"]["merges"] = []
    (other / "tokenizer.json").write_text(json.dumps(conf))
    refused = slm("generate", str(tmp_path / "hf"), "hi", "--speculate", f"draft={other}", "--dtype", "float32")
    assert refused.returncode == 2 and "another tokenizer" in refused.stderr
    fast = slm("generate", str(tmp_path / "hf"), "1 2 3 1 2 3 1 2", "--speculate", "lookup", "--max-tokens", "12",
               "--dtype", "float32")
    assert fast.returncode == 0 and "drafted tokens kept" in fast.stderr, fast.stderr
    card = slm("info", str(tmp_path / "hf"))
    assert card.returncode == 0 and "106,816" in card.stdout
    converted = slm("convert", str(tmp_path / "hf"), str(tmp_path / "tiny.gguf"), "--type", "f32")
    assert converted.returncode == 0, converted.stderr
    back = slm("convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf2"))
    assert back.returncode == 0, back.stderr
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == "llama"


def test_chat_reads_stdin(tmp_path, tiny_tokenizer):
    from slmkit.interop.hf import save_hf
    from slmkit.load import random_model
    from slmkit.presets import get_preset

    save_hf(random_model(get_preset("tiny").config), tiny_tokenizer, tmp_path)
    out = slm("chat", str(tmp_path), "--max-tokens", "4", input_text="hello\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "assistant> " in out.stdout and "tokens/s" in out.stdout


MEMORY_PROBE = """
import torch
from slmkit.load import load
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
torch.zeros(1) @ torch.zeros(1)  # finish torch's lazy setup before the baseline
base = rss()
loaded = load('smollm2-135m-instruct', dtype=torch.float32)
# VmHWM, not ru_maxrss: after fork+exec from a large pytest process, ru_maxrss reports the parent's size
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
weights = sum(p.numel() * 4 for p in loaded.model.parameters())
print(base, peak, weights)
"""


@pytest.mark.slow  # kept out of `make test` for its 15-minute budget; `make bench` runs it
def test_loading_smollm2_needs_at_most_twice_the_weights():
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env=ENV, timeout=300)
    base, peak, weights = map(int, out.stdout.split())
    assert peak - base <= 2 * weights, f"load peak {(peak - base) / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


@pytest.mark.parametrize("verb", ["generate", "chat", "size", "convert", "info"])
def test_help_explains_each_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: slm " + verb in capsys.readouterr().out


def test_template_renders_a_conversation_and_marks_what_a_finetune_trains(tmp_path, tiny_tokenizer, capsys):
    from slmkit.data.sft import Example, encode

    tiny_tokenizer.save(tmp_path)
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    (tmp_path / "chat.json").write_text(json.dumps({"messages": chat}))
    assert main(["template", str(tmp_path), "--user", "Hi", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert out == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).rstrip("\n") + "\n"
    assert "2 messages" in err

    assert main(["template", str(tmp_path), "--messages", str(tmp_path / "chat.json"), "--trained"]) == 0
    marked = capsys.readouterr().out
    encoded = encode(Example(messages=chat), tiny_tokenizer)
    trained = tiny_tokenizer.decode([i for i, t in zip(encoded.ids, encoded.trained) if t], skip_special=False)
    assert "".join(marked.split("⟦")[i].split("⟧")[0] for i in (1, 2)) == trained  # the ⟦ ⟧ spans are the loss

    (tmp_path / "bad.json").write_text('[{"role": "robot", "content": "x"}]')
    assert main(["template", str(tmp_path), "--messages", str(tmp_path / "bad.json")]) == 2
    assert "message 0 must be" in capsys.readouterr().err
    assert main(["template", str(tmp_path), "--user", "Hi", "--trained"]) == 2
    assert "needs an assistant turn" in capsys.readouterr().err

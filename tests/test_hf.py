"""Hugging Face directories: what we write loads in transformers with the same logits, and back."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.hf import save_hf
from slmkit.load import load, random_model
from slmkit.presets import get_preset

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (4, True), (2, False), (2, True), (1, False), (1, True)])
def test_exported_llama_loads_in_transformers_with_same_logits(tmp_path, tiny_tokenizer, kv_heads, tied):
    model = random_model(ModelConfig(**BASE, num_key_value_heads=kv_heads, tie_word_embeddings=tied), seed=0)
    save_hf(model, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] == tied
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(tmp_path, ids)).abs().max() <= 1e-4
    # ... and comes back into slmkit unchanged, tokenizer included.
    again = load(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), ours, rtol=0, atol=0)
    assert again.tokenizer.encode("robot 42") == tiny_tokenizer.encode("robot 42")


@pytest.mark.parametrize("changes,model_type", [
    (dict(num_key_value_heads=2, attention_bias=True, attention_out_bias=False), "qwen2"),
    (dict(num_key_value_heads=2, sliding_window=6), "mistral"),
    (dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "mixtral"),
])
def test_other_families_export_to_their_transformers_class(tmp_path, changes, model_type):
    model = random_model(ModelConfig(**BASE, tie_word_embeddings=False, **changes), seed=1)
    if changes.get("attention_bias"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.02)
    save_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(tmp_path, ids)).abs().max() <= 1e-4


def test_transformers_checkpoint_imports(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = load(str(tmp_path), dtype=torch.float32).model
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-elm", "tiny-shared"])
def test_layouts_hf_cannot_express_round_trip_as_slmkit(tmp_path, preset):
    model = random_model(get_preset(preset).config, seed=2)
    save_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "slmkit"
    again = load(str(tmp_path), dtype=torch.float32).model
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))


def test_smollm2_converted_to_hf_matches_transformers(smollm, tmp_path):
    save_hf(smollm.model, smollm.tokenizer, tmp_path)
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ours = smollm.model(ids)
    assert (ours - _hf_logits(tmp_path, ids)).abs().max() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        smollm.tokenizer.apply_chat_template(messages)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **BASE}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SlmError, match="pickle"):
        load(str(tmp_path))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(SlmError, match="model_type 'gpt_neox' is not supported"):
        load(str(tmp_path))

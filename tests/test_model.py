"""model.py against transformers' own Llama family, and the KV cache against the full forward pass."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.load import random_model
from slmkit.model import CausalLM, attention_mask

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _pair(hf_config_cls, hf_model_cls, ours: dict, theirs: dict | None = None):
    """A random HF model and our model holding the same weights (loaded by name, no renaming)."""
    torch.manual_seed(0)
    hf = hf_model_cls(hf_config_cls(**{**TINY, **ours, **(theirs or {})})).eval()
    model = CausalLM(ModelConfig(**{**TINY, **ours})).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return hf, model


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (4, True), (2, False), (2, True), (1, False), (1, True)])
def test_logits_match_transformers_llama(kv_heads, tied):
    hf, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(num_key_value_heads=kv_heads, tie_word_embeddings=tied))
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=scaling),
                     dict(rope_parameters={**scaling, "rope_theta": 500000.0}))
    ids = torch.randint(0, 97, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen2_biases_match_transformers():
    hf, ours = _pair(transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(num_key_value_heads=2, attention_bias=True, attention_out_bias=False))
    with torch.no_grad():
        for p in hf.parameters():  # HF initialises biases to zero; make them matter
            p.add_(torch.randn_like(p) * 0.02)
        ours.load_state_dict(hf.state_dict(), strict=False)
        ids = torch.randint(0, 97, (2, 19))
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_sliding_window_matches_transformers_mistral():
    hf, ours = _pair(transformers.MistralConfig, transformers.MistralForCausalLM,
                     dict(num_key_value_heads=2, sliding_window=5), dict(attn_implementation="eager"))
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        full = CausalLM(ours.config.replace(sliding_window=None))
        full.load_state_dict(ours.state_dict())
        assert not torch.allclose(full(ids)[:, 10:], ours(ids)[:, 10:]), "the window must change late tokens"


def _check_cache_matches_full(model: CausalLM, chunks=(7, 1, 1, 5, 1)):
    ids = torch.randint(0, model.config.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 64)
        parts, at = [], 0
        for n in chunks:
            parts.append(model(ids[:, at:at + n], cache=cache))
            at += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-elm", "tiny-shared"])
def test_kv_cache_decoding_equals_full_forward(preset):
    from slmkit.presets import get_preset

    _check_cache_matches_full(random_model(get_preset(preset).config, seed=1))


def test_kv_cache_with_sliding_window():
    _check_cache_matches_full(random_model(ModelConfig(**TINY, num_key_value_heads=2, sliding_window=4), seed=2))


def test_mixture_of_experts_routes_top_k_and_one_expert_is_dense():
    from slmkit.model import MLP, SparseMoE

    torch.manual_seed(0)
    moe = SparseMoE(16, 32, n_experts=1, top_k=1)
    dense = MLP(16, 32)
    dense.gate_proj.weight.data, dense.up_proj.weight.data = moe.experts[0].w1.weight.data, moe.experts[0].w3.weight.data
    dense.down_proj.weight.data = moe.experts[0].w2.weight.data
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(x), dense(x))
    # With 4 experts and top-2, each token's output is the weighted sum of exactly its two experts.
    moe = SparseMoE(16, 32, n_experts=4, top_k=2)
    token = torch.randn(1, 1, 16)
    probs = moe.gate(token[0]).softmax(-1)[0]
    top = probs.topk(2)
    expected = sum(w / top.values.sum() * moe.experts[e](token) for w, e in zip(top.values, top.indices.tolist()))
    torch.testing.assert_close(moe(token), expected)


def test_layerwise_scaling_gives_each_block_its_own_width():
    from slmkit.presets import get_preset

    model = random_model(get_preset("tiny-elm").config)
    heads = [b.self_attn.n_heads for b in model.model.layers]
    kv = [b.self_attn.n_kv_heads for b in model.model.layers]
    ffn = [b.mlp.up_proj.out_features for b in model.model.layers]
    assert (heads, kv, ffn) == ([2, 4, 4], [1, 2, 1], [64, 128, 192])


def test_block_sharing_reuses_weights_across_layers():
    """A model with block_repeats=2 equals an unshared model whose layers copy each block twice."""
    shared = random_model(ModelConfig(**{**TINY, "num_hidden_layers": 4}, block_repeats=2), seed=3)
    plain = CausalLM(shared.config.replace(block_repeats=1)).eval()
    state = {k: v for k, v in shared.state_dict().items() if ".layers." not in k}
    for i in range(4):
        for k, v in shared.model.layers[i // 2].state_dict().items():
            state[f"model.layers.{i}.{k}"] = v
    plain.load_state_dict(state)
    assert len(shared.model.layers) == 2
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_shared < sum(p.numel() for p in plain.parameters())
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), plain(ids))


def test_dropout_only_in_training():
    model = random_model(ModelConfig(**TINY, hidden_dropout=0.5, attention_dropout=0.5), seed=4)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_logits_to_keep_returns_the_last_positions():
    model = random_model(ModelConfig(**TINY), seed=5)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1), model(ids)[:, -1:])


def test_padding_queries_never_see_only_masked_keys():
    valid = torch.tensor([[False, False, True, True]])
    mask, causal = attention_mask(0, 4, valid, None)
    assert not causal and mask.shape == (1, 1, 4, 4)
    assert mask.any(-1).all(), "every row must allow at least one key, or SDPA returns NaN"
    assert not mask[0, 0, 3, :2].any(), "real tokens never attend to padding"


def test_pytorch_held_to_avx2_kernels_counts_as_a_cpu_without_bf16_units(monkeypatch):
    from slmkit.layers import cpu_has_native_bf16

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # how PyTorch is told to use AVX2 kernels only
    cpu_has_native_bf16.cache_clear()  # the answer is cached per process
    try:
        assert not cpu_has_native_bf16()
    finally:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY")
        cpu_has_native_bf16.cache_clear()

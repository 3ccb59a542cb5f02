"""Structured pruning: the sliced model is the same function when nothing is cut, loads in
transformers when something is, respects GQA groups, drops the layer that does nothing, and refuses
targets it cannot honour before any work."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.structured import (
    StructuredConfig,
    check_structured,
    importance,
    parse_count,
    prune_structured,
    refit_columns,
)
from slmkit.errors import SlmError
from slmkit.interop.hf import save_checkpoint
from slmkit.load import load, random_model
from slmkit.model import CausalLM
from slmkit.presets import get_preset
from slmkit.sizing import count_params

TINY = get_preset("tiny").config  # hidden 64, ffn 128, 4 heads / 2 kv, 2 layers, vocab 512


def _model(seed: int = 0, **changes) -> CausalLM:
    return random_model(TINY.replace(**changes), seed=seed)


def _calib(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _prune(model, **kwargs):
    return prune_structured(model, StructuredConfig(**kwargs), _calib(), progress=False)


def test_keeping_everything_is_the_identity():
    model = _model(num_hidden_layers=3)
    ids = _calib(2, 12, seed=1)
    with torch.no_grad():
        before = model(ids)
    pruned, report = _prune(model, ffn=128, heads=4, kv_heads=2, hidden=64, layers=3)
    assert pruned is not model and report.params_after == report.params_before
    assert pruned.config.replace(pruning=None) == model.config
    with torch.no_grad():
        assert torch.equal(pruned(ids), before)
        assert torch.equal(model(ids), before)  # the original is left as it was


@pytest.mark.parametrize("tied", [True, False])
def test_pruned_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = _model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=4,
                   tie_word_embeddings=tied)  # head_dim 16
    pruned, report = _prune(model, ffn=64, heads=4, kv_heads=2, hidden=48, layers=3)
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.heads(0), c.kv_heads(0), c.num_hidden_layers) == (48, 64, 4, 2, 3)
    assert c.head_dim == 16 and report.params_after == count_params(c).total < report.params_before
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    save_checkpoint(pruned, None, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["slmkit_pruning"]["method"] == "structured"
    ids = _calib(2, 10, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = pruned(ids)
        assert (ours - hf(ids).logits).abs().max() <= 1e-4
        torch.testing.assert_close(load(str(tmp_path)).model(ids), ours, rtol=0, atol=0)


def test_dead_neurons_groups_and_channels_are_the_ones_removed():
    """Parts that contribute nothing score zero, go first, and the function is unchanged: this checks
    every slice (rows, columns, tied head, norms rescaled for the smaller mean of squares)."""
    model = _model(num_hidden_layers=3, rms_norm_eps=1e-12)  # eps would weigh more in the wider mean
    dead = torch.arange(0, 64, 8)  # 8 hidden channels that are zero everywhere in the residual stream
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[dead] = 0
            block.mlp.down_proj.weight[dead] = 0
            block.mlp.up_proj.weight[:32] = 0  # 32 of 128 neurons output nothing
            block.self_attn.v_proj.weight[16:32] = 0  # KV group 1 (heads 2, 3) outputs nothing
    ids = _calib(2, 12, seed=9)
    with torch.no_grad():
        before = model(ids)
    pruned, _ = _prune(model, hidden=56, ffn=96, kv_heads=1, refit=False)  # exact slices (refit is damped)
    assert pruned.config.head_dim == 16 and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), before, rtol=0, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (6, 3), (3, 1)])
def test_gqa_keeps_query_heads_inside_their_kept_groups(heads, kv_heads):
    model = _model(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, head_dim=16)
    pruned, _ = _prune(model, heads=heads, kv_heads=kv_heads)
    d, per_group = 16, heads // kv_heads

    def head(w, i):
        return w[i * d:(i + 1) * d]

    for old, new in zip(model.model.layers, pruned.model.layers):
        a, b = old.self_attn, new.self_attn
        assert (b.n_heads, b.n_kv_heads) == (heads, kv_heads) and b.q_proj.weight.shape == (heads * d, 144)
        for j in range(kv_heads):  # each kept KV head is an original group; its query heads come from that group
            group = next(g for g in range(3) if torch.equal(head(a.k_proj.weight, g), head(b.k_proj.weight, j)))
            assert torch.equal(head(a.v_proj.weight, group), head(b.v_proj.weight, j))
            for h in range(per_group):
                q = head(b.q_proj.weight, per_group * j + h)
                assert any(torch.equal(head(a.q_proj.weight, 3 * group + i), q) for i in range(3))
    with torch.no_grad():
        assert torch.isfinite(pruned(_calib(1, 8))).all()


@pytest.mark.parametrize("bad,message", [
    ({"heads": 5}, "does not split evenly over the model's 3 KV groups"),
    ({"heads": 4, "kv_heads": 3}, "does not split into --kv-heads 3"),
    ({"heads": 6, "kv_heads": 1}, "keep more KV groups"),
    ({"kv_heads": 4}, "outside 1..3"),
    ({"ffn": 256}, "only removes"),
    ({"hidden": 200}, "only removes"),
    ({"layers": 0}, "outside 1..2"),
    ({}, "needs a target"),
    ({"params": "90M", "ffn": 64}, "chooses --ffn and --hidden itself"),
    ({"params": "1K"}, "embedding alone"),
    ({"params": "1B"}, "nothing to remove"),
    ({"params": "lots"}, "not a parameter count"),
    ({"layers": 1, "layer_metric": "cosine"}, "unknown layer metric"),
])
def test_bad_targets_are_refused_before_any_work(bad, message):
    model = _model(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, head_dim=16)
    with pytest.raises(SlmError, match=message):
        prune_structured(model, StructuredConfig(**bad), None, progress=False)  # no calibration read yet


def test_mixture_of_experts_and_shared_blocks_are_refused():
    for preset in ("tiny-moe", "tiny-shared", "tiny-elm"):
        with pytest.raises(SlmError, match="experts or shared|per-layer widths"):
            check_structured(random_model(get_preset(preset).config), StructuredConfig(layers=1))


def test_params_search_lands_under_the_target_with_exportable_widths():
    with torch.device("meta"):
        smollm = CausalLM(get_preset("smollm2-135m").config)
    for target in (95_000_000, 90_000_000):
        shape = check_structured(smollm, StructuredConfig(params=f"{target / 1e6:g}M"))
        n = count_params(shape).total
        assert 0.97 * target < n <= target
        assert shape.hidden_size % 32 == 0 and shape.ffn_size(0) % 64 == 0  # GGUF q8_0 / q4 blocks
        assert shape.hidden_size % 9 == 0  # transformers' LlamaConfig wants hidden a multiple of the heads
        assert (shape.heads(0), shape.kv_heads(0), shape.num_hidden_layers) == (9, 3, 30)  # width, not depth
        assert shape.resolved_head_dim == 64 and shape.ffn_size(0) < 1536
    with torch.device("meta"):  # with 8 heads the hidden channels can shrink too (multiples of 32)
        wide = CausalLM(get_preset("smollm2-135m").config.replace(num_attention_heads=8, num_key_value_heads=4,
                                                                   head_dim=64))
    shape = check_structured(wide, StructuredConfig(params="95M"))
    assert shape.hidden_size < 576 and shape.hidden_size % 32 == 0 and shape.ffn_size(0) < 1536


def test_parse_count():
    assert parse_count("90M") == 90_000_000 and parse_count("0.5b") == 500_000_000
    assert parse_count("95_000_000") == parse_count(95_000_000) == 95_000_000 and parse_count("12k") == 12_000


@pytest.mark.parametrize("metric", ["block_influence", "angular"])
def test_the_block_that_does_nothing_is_the_one_dropped(metric):
    model = _model(num_hidden_layers=4)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    imp = importance(model, _calib(), progress=False)
    assert int(imp.influence.argmin()) == 2 and float(imp.influence[2]) == 0
    pruned, report = _prune(model, layers=3, layer_metric=metric)
    assert report.dropped_layers == [2] and pruned.config.num_hidden_layers == 3
    ids = _calib(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), model(ids), rtol=0, atol=1e-6)


def test_angular_drops_a_contiguous_run():
    pruned, report = _prune(_model(num_hidden_layers=4), layers=2, layer_metric="angular")
    a, b = report.dropped_layers
    assert b == a + 1 and pruned.config.num_hidden_layers == 2


def test_per_layer_widths_follow_importance_and_load_back(tmp_path):
    model = _model()
    with torch.no_grad():  # layer 0 has only 32 live neurons: it should keep fewer than layer 1
        model.model.layers[0].mlp.up_proj.weight[32:].zero_()
    pruned, report = _prune(model, ffn=64, per_layer=True)
    ffn = pruned.config.intermediate_size
    assert isinstance(ffn, list) and sum(ffn) == 128 and ffn[0] < ffn[1]
    assert any("model_type 'slmkit'" in note for note in report.notes)
    save_checkpoint(pruned, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "slmkit"
    ids = _calib(1, 10, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(load(str(tmp_path)).model(ids), pruned(ids), rtol=0, atol=0)


def test_a_pruned_shape_quantized_with_gptq_runs_in_llama_cpp_like_slmkit(tmp_path, tiny_tokenizer):
    """The issue's last step on a tiny model: structured prune -> GPTQ -> GGUF q4_k_m -> llama.cpp."""
    from conftest import LLAMA_CPP_MISSING

    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from test_quant import _llama_cpp_agrees

    from slmkit.compress.quant.quantize import QuantConfig, quantize_model
    from slmkit.interop.gguf import write_gguf

    shape = TINY.replace(vocab_size=tiny_tokenizer.vocab_size, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=3)  # q4_k_m needs input widths that are multiples of 256
    model = random_model(shape, seed=0)
    with torch.no_grad():  # a random model's logits are near-uniform: sharpen them so greedy has clear choices
        model.model.norm.weight.mul_(20.0)  # (near-ties flip with any kernel's rounding, here or in llama.cpp)
    ids = torch.randint(0, shape.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    pruned, _ = prune_structured(model, StructuredConfig(ffn=512, layers=2), ids, progress=False)
    quantize_model(pruned, QuantConfig(method="gptq", group_size=64), ids, progress=False)
    path = write_gguf(pruned, tiny_tokenizer, tmp_path / "pruned-q4_k_m.gguf", "q4_k_m")
    prompt = tiny_tokenizer.encode("Once upon a time there was", add_special=False)
    assert _llama_cpp_agrees(load(str(path), dtype=torch.float32).model, path, prompt, 16) >= 4


def test_refit_at_full_width_reproduces_the_layer():
    w = torch.randn(6, 10)
    x = torch.randn(500, 10)
    same = refit_columns(w, x.T @ x / 500, torch.arange(10), damp=0.0)
    torch.testing.assert_close(same, w, rtol=1e-4, atol=1e-4)


def test_refit_folds_a_dropped_input_that_the_kept_ones_predict():
    """Column 3 of the input is 2 x column 1: dropping it loses nothing once its weight moves to column 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    x[:, 3] = 2 * x[:, 1]
    w = torch.randn(5, 8, generator=gen)
    kept = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    refit = refit_columns(w, x.T @ x / 400, kept, damp=1e-6)
    torch.testing.assert_close(x[:, kept] @ refit.T, x @ w.T, rtol=1e-3, atol=1e-3)
    assert (x[:, kept] @ w[:, kept].T - x @ w.T).abs().max() > 0.1  # plain slicing does lose it


def test_refit_lowers_the_pruned_models_error():
    """Correlated neurons (random inputs through a real MLP): the refit model is closer to the original."""
    model = _model(num_hidden_layers=2)
    ids = _calib(2, 12, seed=3)
    with torch.no_grad():
        full = model(ids)
    errors = {}
    for refit in (False, True):
        pruned, _ = prune_structured(model, StructuredConfig(ffn=64, heads=2, kv_heads=1, refit=refit),
                                     _calib(8, 32), progress=False)
        with torch.no_grad():
            errors[refit] = (pruned(ids) - full).pow(2).mean().item()
        assert pruned.config.pruning["refit"] is refit
    assert errors[True] < errors[False]

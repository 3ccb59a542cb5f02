"""Quantization: packed int8/int4 linears, RTN/GPTQ/AWQ, checkpoints, bad input, GGUF quantized exports."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import LLAMA_CPP_MISSING
from torch import nn

from slmkit.compress.calibrate import LinearStats
from slmkit.compress.quant.awq import apply_scales, search_clip, search_scales
from slmkit.compress.quant.gptq import gptq_int4
from slmkit.compress.quant.qlinear import Int4Linear, Int8Linear, kernel_layout
from slmkit.compress.quant.quantize import QuantConfig, quantize_model
from slmkit.compress.quant.rtn import fake_int4, quantize_int4, quantize_int8
from slmkit.compress.quant.tied import TiedEmbedding
from slmkit.data.calibration import calibration_ids, check_calibration
from slmkit.data.tasks import task_data
from slmkit.errors import SlmError
from slmkit.interop.hf import save_checkpoint

Q = gguf.GGMLQuantizationType


def _calib(tokenizer, cfg: QuantConfig, model) -> torch.Tensor:
    return calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size)


def _tiny(seed: int = 0, **changes):
    from dataclasses import replace

    from slmkit.load import random_model
    from slmkit.presets import get_preset

    return random_model(replace(get_preset("tiny").config, **changes), seed=seed)


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few large channels and correlated columns, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x[:, :4] *= 20  # outlier channels
    return x


# -- kernels and formats --------------------------------------------------------------------------


def test_int8_codes_loaded_at_an_odd_offset_are_realigned():
    # safetensors hands out tensors at their file offset; the int8 kernel crashed on unaligned codes
    w = torch.randn(576, 576)
    codes, scales = quantize_int8(w)
    reference = Int8Linear.from_codes(codes, scales)
    storage = torch.zeros(codes.numel() + 64, dtype=torch.int8)
    odd = storage[40: 40 + codes.numel()].view(576, 576)
    odd.copy_(codes)
    layer = Int8Linear(576, 576)
    layer.load_state_dict({"qweight": odd, "scales": scales}, assign=True)
    x = torch.randn(4, 576)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("k,group", [(64, 32), (96, 32), (576, 64), (576, 128)])
def test_int4_linear_multiplies_by_its_dequantized_weight(k, group):
    w = torch.randn(40, k)  # 40 rows: not a multiple of the kernel's 16
    q = quantize_int4(w, group)
    layer = Int4Linear.from_codes(q.codes, q.scales, q.zeros, group, k)
    x = torch.randn(5, k)
    expected = x @ q.dequantize().T
    torch.testing.assert_close(layer(x), expected, rtol=0.02, atol=0.05 * expected.abs().mean().item())
    assert torch.equal(layer.codes(), q.codes)  # the kernel's private packing is read back exactly
    assert torch.equal(layer.dequantized(), q.dequantize())


def test_int8_linear_and_rounding_errors_are_within_half_a_step():
    w = torch.randn(40, 64)
    codes, scales = quantize_int8(w)
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()
    layer = Int8Linear.from_codes(codes, scales, bias=torch.randn(40))
    x = torch.randn(3, 64)
    expected = x @ (codes.float() * scales[:, None]).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0.02, atol=0.02 * expected.abs().mean().item())
    q = quantize_int4(w, 32)
    step = q.scales.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_kernel_layout_is_a_permutation():
    source = kernel_layout(64, 128)
    assert torch.equal(torch.sort(source).values, torch.arange(64 * 128))


# -- calibrated methods ---------------------------------------------------------------------------


def test_siblings_share_one_int4_kernel_call_and_give_the_same_logits(tmp_path):
    from slmkit.compress.quant.fused import fuse_shared_inputs
    from slmkit.infer.engine import Engine
    from slmkit.infer.sampling import SamplingParams

    model = _tiny()
    quantize_model(model, QuantConfig(method="int4", group_size=32), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared_kernel is attn.v_proj.shared_kernel is not None
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    prompt = ids[0].tolist()
    fused_logits = model(ids)
    fused_tokens = Engine(model).generate([prompt], SamplingParams(max_new_tokens=8))[0].tokens
    calls = []
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
        model(ids)
    assert len(calls) == 2 * 4  # per block: q/k/v, o, gate/up, down (the head is int8: head_bits)
    attn.k_proj(torch.randn(3, attn.k_proj.in_features))  # a sibling called alone still answers
    for m in {id(m.shared_kernel): m.shared_kernel for m in model.modules() if getattr(m, "shared_kernel", None)}.values():
        m.dissolve()
    assert torch.equal(model(ids), fused_logits)
    assert Engine(model).generate([prompt], SamplingParams(max_new_tokens=8))[0].tokens == fused_tokens
    assert fuse_shared_inputs(model) == 4  # 2 blocks x (q/k/v, gate/up)
    save_checkpoint(model, None, tmp_path / "q")  # checkpoint tensors are read back from the shared packing
    from slmkit.load import load

    assert torch.equal(load(str(tmp_path / "q")).model(ids), fused_logits)


@pytest.mark.parametrize("heights", [(64, 128, 128), (48, 16, 16)])  # stacked packings / repacked codes
def test_a_shared_kernel_gives_each_sibling_its_own_output(heights):
    from slmkit.compress.quant.fused import SharedInputKernel

    g = torch.Generator().manual_seed(0)
    siblings = [Int4Linear.from_codes(torch.randint(0, 16, (n, 96), generator=g), torch.rand(n, 3, generator=g),
                                      torch.randint(0, 16, (n, 3), generator=g).to(torch.uint8), 32, 96)
                for n in heights]
    x = torch.randn(5, 96, generator=g)
    alone, weights = [m(x) for m in siblings], [m.dequantized() for m in siblings]
    kernel = SharedInputKernel(siblings)
    for m in siblings:
        m.shared_kernel = kernel
    for m, expected, weight in zip(siblings, alone, weights):
        assert torch.equal(m(x), expected)
        assert torch.equal(m.dequantized(), weight)  # codes still read back from the shared packing


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x @ (wq - w).T).pow(2).mean().item()


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(2048, 128)
    linear = nn.Linear(128, 64, bias=False)
    tap = LinearStats(linear)
    linear(x)
    h = tap.close().hessian
    torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    rtn = _output_error(x, w, fake_int4(w, 32))
    for act_order in (False, True):
        gptq = _output_error(x, w, gptq_int4(w, h, 32, act_order=act_order).dequantize())
        assert gptq < 0.7 * rtn, (act_order, gptq, rtn)


def test_awq_scales_and_clipping_beat_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(1024, 128)
    s = search_scales(x, [w], 32)
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.ones(128))
    linear = nn.Linear(128, 64, bias=False)
    linear.weight.data = w.clone()
    apply_scales(norm, [linear], s)
    torch.testing.assert_close((x * norm.weight) @ linear.weight.T, x @ w.T, rtol=1e-4, atol=1e-4)  # float unchanged
    xs = x * norm.weight
    awq = _output_error(xs, linear.weight, fake_int4(search_clip(xs, linear.weight, 32), 32))
    assert awq < 0.8 * _output_error(x, w, fake_int4(w, 32))


# -- whole models and checkpoints -----------------------------------------------------------------


@pytest.mark.parametrize("method,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantized_checkpoint_reloads_to_the_same_logits(tmp_path, method, group):
    from slmkit.load import load

    model = _tiny()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = model(ids)
    report = quantize_model(model, QuantConfig(method=method, group_size=group), progress=False)
    logits = model(ids)
    assert len(report.quantized) == 15 and "lm_head" in report.quantized
    assert (logits - reference).abs().max() < 0.3 * reference.abs().max()
    save_checkpoint(model, None, tmp_path / "q")
    again = load(str(tmp_path / "q")).model
    assert type(again.lm_head) is type(model.lm_head) and again.config.quantization["method"] == method
    stored = {k: v["dtype"] for k, v in _header(tmp_path / "q" / "model.safetensors").items() if k.endswith("scales")}
    blocks = {d for k, d in stored.items() if "layers" in k}  # int4 group scales are fp16 values: 2 bytes each
    assert blocks == ({"F16"} if method == "int4" else {"F32"})
    assert torch.equal(again(ids), logits)
    # the head stays tied: the embedding looks up rows of the head's one table of codes
    assert isinstance(again.model.embed_tokens, TiedEmbedding) and again.config.tie_word_embeddings
    assert torch.equal(again.model.embed_tokens(ids), again.lm_head.dequantized()[ids])
    assert not any("embed_tokens" in k for k in again.state_dict())


def _header(path) -> dict:
    """The tensors' entries of a safetensors file's JSON header (dtype, shape, offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(size)).items() if k != "__metadata__"}


@pytest.mark.parametrize("method", ["int8", "int4", "gptq"])
def test_a_tied_head_stays_tied_one_table_stored_once(tmp_path, tiny_tokenizer, method):
    from slmkit.compress.quant.qlinear import weight_count
    from slmkit.interop.hf import save_hf

    model = _tiny(vocab_size=tiny_tokenizer.vocab_size, hidden_size=128, intermediate_size=256)
    floats = weight_count(model)
    cfg = QuantConfig(method=method, group_size=32, calib_samples=4, calib_seq_len=64)
    quantize_model(model, cfg, _calib(tiny_tokenizer, cfg, model) if method == "gptq" else None, progress=False)
    assert isinstance(model.model.embed_tokens, TiedEmbedding) and model.config.tie_word_embeddings
    assert weight_count(model) == floats  # the shared table counts once, as the float model's did
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.model.embed_tokens(ids), model.lm_head.dequantized()[ids])
    save_hf(model, None, tmp_path / "q")
    untied = _tiny(vocab_size=tiny_tokenizer.vocab_size, hidden_size=128, intermediate_size=256)
    quantize_model(untied, dataclasses.replace(cfg, method="int8" if method == "int8" else "int4", tie=False),
                   progress=False)
    save_hf(untied, None, tmp_path / "untied")
    size = lambda name: (tmp_path / name / "model.safetensors").stat().st_size  # noqa: E731
    table = tiny_tokenizer.vocab_size * 128 * 4  # the float embedding an untied head leaves behind
    assert size("untied") - size("q") > 0.9 * table


def test_untying_says_what_it_costs(tiny_tokenizer, capsys):
    model = _tiny(vocab_size=tiny_tokenizer.vocab_size)
    quantize_model(model, QuantConfig(method="int8", tie=False), progress=False)
    assert "untying the output head" in capsys.readouterr().out
    assert type(model.model.embed_tokens) is nn.Embedding and not model.config.tie_word_embeddings


@pytest.mark.parametrize("method,group,file_type,hidden", [
    ("int8", 0, "q8_0", 256), ("int4", 32, "q4_1", 256), ("int4", 64, "q4_1", 256), ("gptq", 128, "q4_1", 256),
    ("int4", 64, "q4_1", 96)])  # 96 = a group and a half: the last group is zero-padded, still exact
def test_gguf_export_writes_quantized_codes_without_rounding_them_again(tmp_path, tiny_tokenizer, method, group,
                                                                         file_type, hidden, capsys):
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load

    model = _tiny(vocab_size=tiny_tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden)
    cfg = QuantConfig(method=method, group_size=group or 32, calib_samples=4, calib_seq_len=64, pad_groups=True)
    quantize_model(model, cfg, _calib(tiny_tokenizer, cfg, model) if method == "gptq" else None, progress=False)
    path = write_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", file_type)
    assert "rounded a second time" not in capsys.readouterr().err
    again = load(str(path)).model.state_dict()
    for name, ours in model.state_dict().items():
        if name.endswith(".qweight"):
            layer = model.get_submodule(name.rpartition(".")[0])
            w = layer.dequantized()
            step = layer.scales.abs().max()  # the largest quantization step of the matrix
            theirs = again[name.replace(".qweight", ".weight")] if "lm_head" not in name else \
                again["model.embed_tokens.weight"]
            # only d and m are rounded (to fp16, 11 bits): an int8 code of 127 moves by 127 / 2048 of a
            # step, an int4 one by less than 32 / 2048; rounding again moves values by up to half a step
            assert (theirs - w).abs().max() < (0.07 if layer.bits == 8 else 0.02) * step, name

    # a type whose blocks cannot hold the grid rounds again, and says by how much
    write_gguf(model, tiny_tokenizer, tmp_path / "q4_0.gguf", "q4_0" if method != "int8" else "q4_1")
    note = capsys.readouterr().err
    assert "rounded a second time: relative RMS error" in note and "%" in note


def test_quantized_files_are_4x_and_7x_smaller_for_the_linear_weights(tmp_path):
    from safetensors import safe_open

    def linear_bytes(path, model):
        names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))}
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                       if k.rpartition(".")[0] in names)

    sizes = {}
    for method in ("fp32", "int8", "int4"):
        model = _tiny(hidden_size=256, intermediate_size=512)
        if method != "fp32":
            quantize_model(model, QuantConfig(method=method, group_size=128, lm_head=False), progress=False)
        from slmkit.interop.hf import save_hf

        save_hf(model, None, tmp_path / method)
        sizes[method] = linear_bytes(tmp_path / method, model)
    assert sizes["fp32"] / sizes["int8"] > 3.9
    assert sizes["fp32"] / sizes["int4"] > 6.9


def test_calibrated_methods_quantize_a_model(tmp_path, tiny_tokenizer):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000. " * 200)
    ids = torch.tensor([tiny_tokenizer.encode("Once upon a time there was a little robot", add_special=False)])
    reference = _tiny(vocab_size=tiny_tokenizer.vocab_size)(ids)
    errors = {}
    for method in ("int4", "gptq", "awq"):
        model = _tiny(vocab_size=tiny_tokenizer.vocab_size)
        cfg = QuantConfig(method=method, group_size=32, calib=str(text), calib_samples=4, calib_seq_len=64,
                          head_bits=4, tie=False)  # a 4-bit head of its own is calibrated too
        quantize_model(model, cfg, _calib(tiny_tokenizer, cfg, model), progress=False)
        assert all(isinstance(model.get_submodule(n), Int4Linear) for n in ("lm_head", "model.layers.1.mlp.down_proj"))
        errors[method] = (model(ids) - reference).pow(2).mean().item()
    assert errors["gptq"] < errors["int4"] and errors["awq"] < errors["int4"], errors


# -- bad input ------------------------------------------------------------------------------------


def test_bad_quantization_settings_are_refused_before_any_work(tmp_path, tiny_tokenizer):
    cases = [(dict(method="int3"), "unknown"), (dict(group_size=48), "not supported"),
             (dict(group_size=128), "too small"), (dict(skip=["proj", "lm_head"]), None)]
    model = _tiny(intermediate_size=96)
    with pytest.raises(SlmError, match="does not divide the input width 96.*--pad-groups"):
        quantize_model(model, QuantConfig(method="int4", group_size=64), progress=False)
    for changes, match in cases[:3]:
        with pytest.raises(SlmError, match=match):
            quantize_model(_tiny(), QuantConfig(**changes), progress=False)
    assert quantize_model(_tiny(intermediate_size=96), QuantConfig(group_size=64, pad_groups=True),
                          progress=False).quantized
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SlmError, match="empty"):
        calibration_ids(tiny_tokenizer, str(empty), 2, 64, tiny_tokenizer.vocab_size)
    text = tmp_path / "calib.txt"
    text.write_text("a robot counts " * 300)
    with pytest.raises(SlmError, match="tokenizer is not the model's"):
        calibration_ids(tiny_tokenizer, str(text), 2, 64, 64)
    ids = calibration_ids(tiny_tokenizer, str(text), 2, 64, tiny_tokenizer.vocab_size)
    with pytest.raises(SlmError, match="another tokenizer"):  # ids handed over directly are checked too
        quantize_model(_tiny(vocab_size=64), QuantConfig(method="awq", group_size=32), ids, progress=False)
    with pytest.raises(SlmError, match="exceed the model's context of 256"):
        quantize_model(_tiny(), QuantConfig(method="gptq", group_size=32), ids.reshape(1, 128).repeat(1, 3),
                       progress=False)
    with pytest.raises(SlmError, match="experts"):
        quantize_model(_tiny(num_local_experts=2), QuantConfig(method="gptq", group_size=32), ids, progress=False)
    with pytest.raises(SlmError, match="needs calibration token ids"):
        quantize_model(_tiny(), QuantConfig(method="gptq", group_size=32), None, progress=False)


def test_an_interrupted_save_leaves_no_checkpoint_under_the_target_name(tmp_path, monkeypatch):
    import slmkit.interop.hf as hf

    model = _tiny()
    quantize_model(model, QuantConfig(method="int8"), progress=False)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- GGUF quantized exports -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_blocks_decode_with_ggufs_dequantizer(kind):
    from slmkit.interop.gguf_quants import encode

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 2, (8, 1))).astype(np.float32)
    data[0, :256] = 0.0  # an all-zero block must not divide by zero
    raw = encode(data, kind)
    assert raw.shape == (8, 2 * gguf.GGML_QUANT_SIZES[Q[kind]][1])
    back = gguf.quants.dequantize(raw, Q[kind])
    blocks, decoded = data.reshape(-1, 256), back.reshape(-1, 256)
    levels = 15 if kind == "Q4_K" else 63
    for original, got in zip(blocks, decoded):
        span = original.max() - min(original.min(), 0) if kind == "Q4_K" else 2 * np.abs(original).max()
        assert np.abs(got - original).max() <= 1.5 * span / levels + 1e-6


@pytest.mark.parametrize("file_type,types", [("q8_0", {"Q8_0"}), ("q4_0", {"Q4_0", "Q6_K"}), ("q4_1", {"Q4_1", "Q6_K"}),
                                             ("q4_k_m", {"Q4_K", "Q6_K", "Q5_0", "Q8_0"})])
def test_quantized_gguf_exports_read_back_and_reimport(tmp_path, tiny_tokenizer, file_type, types):
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load

    model = _tiny(vocab_size=tiny_tokenizer.vocab_size, hidden_size=256, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8)
    path = write_gguf(model, tiny_tokenizer, tmp_path / f"m-{file_type}.gguf", file_type)
    reader = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k for n, k in kinds.items() if n.endswith(".weight") and "norm" not in n} <= types
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k_m": 15}[
        file_type]
    if file_type == "q4_k_m":  # the 6-bit layers llama.cpp picks for attn_v/ffn_down
        assert kinds["blk.0.ffn_down.weight"] == "Q6_K" and kinds["blk.1.ffn_down.weight"] == "Q4_K"
    if file_type != "q8_0":  # the tied head in 6 bits in every 4-bit mix, as llama-quantize writes it
        assert kinds["token_embd.weight"] == "Q6_K"
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    again = load(str(path)).model
    ref, got = torch.log_softmax(model(ids), -1), torch.log_softmax(again(ids), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert kl < (1e-3 if file_type == "q8_0" else 2e-2), kl


def test_a_quantized_slmkit_model_exports_to_gguf(tmp_path, tiny_tokenizer):
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load

    model = _tiny(vocab_size=tiny_tokenizer.vocab_size)
    quantize_model(model, QuantConfig(method="int8"), progress=False)
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    path = write_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", "f32")
    torch.testing.assert_close(load(str(path)).model(ids), model(ids), rtol=0.02, atol=0.02)


def test_gguf_type_that_does_not_fit_a_tensor_is_refused(tmp_path, tiny_tokenizer):
    from slmkit.interop.gguf import write_gguf

    model = _tiny(vocab_size=tiny_tokenizer.vocab_size, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(SlmError, match="not a multiple of the 32-value blocks"):
        write_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf", "q4_0")
    assert not list(tmp_path.iterdir())
    with pytest.raises(SlmError, match="not supported"):
        write_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf", "q3_k")


# -- llama.cpp runs our exports (the [llamacpp] extra; skipped without it) ---------------------------


NEAR_TIE = 0.1  # logit margin below which llama.cpp's 8-bit activations may legitimately flip the argmax


def _llama_cpp_agrees(model, path, prompt: list[int], new: int, near_tie: float = NEAR_TIE) -> int:
    """Compare llama.cpp on `path` with slmkit's `model`; returns how many greedy tokens were compared.

    llama.cpp multiplies q8_0 weights by activations it rounds to 8 bits, so its logits differ from
    ours by a few tenths and a near-tie can flip. So: (1) teacher-forced over slmkit's greedy
    continuation, llama.cpp's argmax equals ours at every position whose top-2 margin is at least
    `near_tie`; (2) llama.cpp's own greedy continuation equals ours up to the first near-tie.
    """
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from slmkit.infer.engine import Engine
    from slmkit.infer.sampling import SamplingParams

    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=new))[0].tokens
    sequence = prompt + ours
    with torch.no_grad():
        logits = model(torch.tensor([sequence]))[0, len(prompt) - 1 : -1].float()  # predicts each of ours
    top2 = logits.topk(2).values
    decided = (top2[:, 0] - top2[:, 1] >= near_tie).numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    llm.eval(sequence)
    theirs = np.asarray(llm.scores[len(prompt) - 1 : len(sequence) - 1]).argmax(-1)
    assert (theirs == np.array(ours))[decided].all(), (theirs, ours, decided)
    until = int(np.argmin(decided)) if not decided.all() else new
    greedy = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if len(greedy) == until:
            break
        greedy.append(int(token))
    assert greedy == ours[:until]
    return until


def test_llama_cpp_continues_our_q8_0_smollm2_export_like_slmkit(tmp_path, smollm):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load

    path = write_gguf(smollm.model, smollm.tokenizer, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    prompt = smollm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    # the first near-tie of this prompt's continuation is its 15th token
    assert _llama_cpp_agrees(load(str(path), dtype=torch.float32).model, path, prompt, 32) >= 14


@pytest.mark.parametrize("method,file_type", [("int8", "q8_0"), ("int4", "q4_1")])
def test_llama_cpp_runs_our_quantized_smollm2_with_its_tied_table_like_slmkit(tmp_path, smollm, method, file_type):
    """The codes slmkit chose are the GGUF's (no second rounding, one tied table), so llama.cpp's logits
    follow our quantized model's, not the float model's it came from."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    import copy

    from slmkit.interop.gguf import write_gguf

    model = copy.deepcopy(smollm.model)
    quantize_model(model, QuantConfig(method=method, group_size=64), progress=False)
    path = write_gguf(model, smollm.tokenizer, tmp_path / f"smollm2-{method}.gguf", file_type)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}  # one table, tied
    ids = smollm.tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin, and the "
                                  "capital of Italy is Rome. Each of these cities has a long history.")
    with torch.no_grad():
        ours, floats = (m(torch.tensor([ids]))[0].float() for m in (model, smollm.model))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    llm.eval(ids)
    theirs = torch.from_numpy(np.asarray(llm.scores[: len(ids)]).copy())
    gap = lambda a, b: (a - b).abs().amax(-1).mean().item()  # noqa: E731  mean over positions of max |diff|
    # our kernels round activations to bf16 and llama.cpp to 8 bits: ~0.8 apart at most positions (measured)
    assert gap(theirs, ours) < 1.2
    top2 = ours.topk(2).values
    decided = top2[:, 0] - top2[:, 1] >= 0.5
    assert torch.equal(theirs.argmax(-1)[decided], ours.argmax(-1)[decided])
    if method == "int4":  # int4 moved the model away from its float self; llama.cpp moved with it
        assert gap(theirs, ours) < 0.25 * gap(floats, ours)


def test_llama_cpp_runs_a_model_slmkit_trained(tmp_path, story_data):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from slmkit.config import from_dict
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load
    from slmkit.train.pretrain import PretrainConfig, run

    cfg = from_dict(PretrainConfig, {
        "data": str(story_data), "out": str(tmp_path / "run"),
        "model": {"vocab_size": 0, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
        "train": {"steps": 120, "micro_batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10,
                  "eval_every": 0, "checkpoint_every": 0, "precision": "fp32"}})
    run(cfg)
    trained = load(str(tmp_path / "run" / "final"), dtype=torch.float32)
    path = write_gguf(trained.model, trained.tokenizer, tmp_path / "story.gguf", "f32")
    prompt = trained.tokenizer.encode("Once upon a time", add_special=False)
    # f32 weights: llama.cpp multiplies in fp32 too, so only margins under 0.01 count as ties
    assert _llama_cpp_agrees(trained.model, path, prompt, 24, near_tie=0.01) >= 8


def test_cli_quantize_generate_and_export(tmp_path, tiny_tokenizer):
    import os
    import subprocess
    import sys

    from slmkit.interop.hf import save_hf

    save_hf(_tiny(vocab_size=tiny_tokenizer.vocab_size), tiny_tokenizer, tmp_path / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    done = slm("quantize", str(tmp_path / "tiny"), "--method", "int4", "--group-size", "32", "-o", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr
    assert "15 linears quantized" in done.stdout and (tmp_path / "q" / "model.safetensors").is_file()
    generated = slm("generate", str(tmp_path / "q"), "Once upon", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    exported = slm("export", "gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--type", "q8_0")
    assert exported.returncode == 0 and (tmp_path / "q.gguf").is_file(), exported.stderr
    bad = slm("quantize", str(tmp_path / "tiny"), "--method", "int4", "--group-size", "128", "-o", str(tmp_path / "b"))
    assert bad.returncode == 2 and "too small" in bad.stderr and not (tmp_path / "b").exists()


def test_prepared_calibration_data_must_share_the_models_tokenizer(story_data, tiny_tokenizer):
    from slmkit.tokenizer import Tokenizer

    with pytest.raises(SlmError, match="different tokenizer"):
        calibration_ids(tiny_tokenizer, str(story_data), 2, 32, 512)
    ids = calibration_ids(Tokenizer.from_dir(story_data), str(story_data), 2, 32, 512)
    assert ids.shape == (2, 32)


def test_calibration_on_a_task_reads_its_training_chats_only(tiny_tokenizer, data_dir):
    """`task:NAME` windows are the task's training conversations, rendered with the chat template
    and shuffled (the file groups rows by label); no validation or test row is ever read."""
    data = task_data("symptom2disease", data_dir / "tasks")
    ids = calibration_ids(tiny_tokenizer, "task:symptom2disease", 8, 256, tiny_tokenizer.vocab_size)
    assert ids.shape == (8, 256)
    text = tiny_tokenizer.decode(ids.flatten().tolist(), skip_special=False)
    assert "<|im_start|>assistant\n" in text and data.train[0].messages[0]["content"] in text
    answers = {e.label for e in data.train if f"\n{e.label}<|im_end|>" in text}
    assert len(answers) > 5  # a shuffled sample of the diseases, not the file's first label
    held_out = [e.messages[1]["content"] for e in data.split("val") + data.split("test")]
    assert not any(user in text for user in held_out)
    with pytest.raises(SlmError, match="no_such_task"):
        check_calibration("task:no_such_task")
    with pytest.raises(SlmError, match="not found"):
        check_calibration("no/such/file.txt")

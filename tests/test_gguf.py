"""GGUF import/export: RoPE permutation, SmolLM2 against transformers, read-back, quant types, bad files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.gguf import permute_qk, unpermute_qk, write_gguf
from slmkit.load import load, random_model
from slmkit.model import apply_rope, rope_cos_sin, rope_inv_freq

Q = gguf.GGMLQuantizationType


def test_qk_permutation_round_trip_is_identity():
    w = torch.randn(6 * 16, 40)
    assert torch.equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not torch.equal(permute_qk(w, 6), w)


def _interleaved_rope(x, positions, theta=10000.0):
    """ggml's llama RoPE: rotate dimension pairs (2i, 2i+1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angle = positions[:, None].float() * inv  # (T, D/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * angle.cos() - x1 * angle.sin()
    out[..., 1::2] = x0 * angle.sin() + x1 * angle.cos()
    return out


def test_permuted_weights_give_the_same_attention_scores_under_ggml_rope():
    torch.manual_seed(0)
    heads, hd, d_in, t = 2, 8, 16, 5
    wq, wk, x = torch.randn(heads * hd, d_in), torch.randn(heads * hd, d_in), torch.randn(t, d_in)
    pos = torch.arange(t)
    cos, sin = rope_cos_sin(rope_inv_freq(hd, 10000.0), pos[None], torch.float32)

    def scores(q, k):
        return torch.einsum("htd,hsd->hts", q, k)

    def split(y):
        return y.view(t, heads, hd).transpose(0, 1)  # (H, T, D)

    q_hf = apply_rope(split(x @ wq.T)[None], cos, sin)[0]
    k_hf = apply_rope(split(x @ wk.T)[None], cos, sin)[0]
    q_gg = _interleaved_rope(split(x @ permute_qk(wq, heads).T), pos)
    k_gg = _interleaved_rope(split(x @ permute_qk(wk, heads).T), pos)
    torch.testing.assert_close(scores(q_gg, k_gg), scores(q_hf, k_hf), rtol=1e-4, atol=1e-4)


def test_smollm2_logprobs_match_transformers_on_512_tokens(smollm, hf_smollm, data_dir):
    hf_model, _ = hf_smollm
    text = (data_dir / "corpus" / "tinystories" / "tinystories_train_sample.txt").read_text()[:4000]
    ids = torch.tensor([smollm.tokenizer.encode(text)[:512]])
    assert ids.shape[1] == 512
    with torch.no_grad():
        ours = smollm.model(ids).log_softmax(-1)
        theirs = hf_model(ids).logits.log_softmax(-1)
    diff = (ours - theirs).abs().mean().item()
    assert diff <= 1e-3, diff
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_config_from_gguf(smollm):
    c = smollm.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.heads(0), c.kv_heads(0), c.ffn_size(0)) == (30, 576, 9, 3, 1536)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152


@pytest.mark.parametrize("file_type,tol", [("f32", 0.0), ("f16", 2e-3)])
def test_export_reads_back_and_reimports(tmp_path, tiny_tokenizer, file_type, tol):
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, name="tiny-export")
    model = random_model(config, seed=0)
    path = write_gguf(model, tiny_tokenizer, tmp_path / "tiny.gguf", file_type)
    reader = gguf.GGUFReader(str(path))
    field = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == "llama" and field["llama.block_count"] == 2
    assert field["llama.attention.head_count_kv"] == 2 and field["llama.rope.dimension_count"] == 16
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 512  # padded to the embedding rows
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= set(tensors)
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == (Q.F32 if file_type == "f32" else Q.F16)
    again = load(str(path), dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), model(ids), rtol=tol, atol=tol or 1e-6)
    assert again.tokenizer.encode("a little robot 42") == tiny_tokenizer.encode("a little robot 42")


def test_moe_export_round_trip(tmp_path, tiny_tokenizer):
    from slmkit.presets import get_preset

    model = random_model(get_preset("tiny-moe").config, seed=1)
    again = load(str(write_gguf(model, tiny_tokenizer, tmp_path / "moe.gguf", "f32")), dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), model(ids))


# Byte offsets of the fp16 super-block scales (d, dmin) inside each K-quant block (ggml-common.h).
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks with finite scales (gguf-py has no K-quant quantizer to make real ones)."""
    block, type_size = gguf.GGML_QUANT_SIZES[Q[kind]]
    blocks = rng.integers(0, 256, (rows * (cols // block), type_size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[kind]:
        scales = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16",
                                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_types_import_as_gguf_dequantizes_them(tmp_path, tiny_tokenizer, kind):
    """Each tensor type imports to exactly what gguf's dequantizer gives, with q/k un-permuted."""
    kind_q = Q[kind]
    config = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = random_model(config, seed=2)
    rng = np.random.default_rng(0)
    stored = {}

    def encode(name, data):
        if data.ndim < 2:
            return data, Q.F32
        if kind.endswith("_K"):
            raw = _random_blocks(kind, *data.shape, rng)
        else:
            raw = gguf.quants.quantize(data, kind_q)
        stored[name] = gguf.quants.dequantize(raw, kind_q).reshape(data.shape)
        return raw, kind_q

    path = write_gguf(model, tiny_tokenizer, tmp_path / f"{kind}.gguf", encode=encode)
    state = load(str(path), dtype=torch.float32).model.state_dict()
    q_expected = unpermute_qk(torch.from_numpy(stored["blk.0.attn_q.weight"].copy()), 4)
    assert torch.isfinite(q_expected).all()
    torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], q_expected)
    up = torch.from_numpy(stored["blk.0.ffn_up.weight"].copy())
    torch.testing.assert_close(state["model.layers.0.mlp.up_proj.weight"], up)


# -- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(SlmError, match="not found"):
        load(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, I am text")
    with pytest.raises(SlmError, match="is not a GGUF file"):
        load(str(path))


def test_truncated_file(tmp_path):
    from slmkit.load import bundled_gguf

    path = tmp_path / "cut.gguf"
    path.write_bytes(bundled_gguf().read_bytes()[:100_000])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        load(str(path))


def _minimal_gguf(path, arch="llama", tensor_type=Q.F32):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    data = np.zeros((4, 4), dtype=np.float64 if tensor_type == Q.F64 else np.float32)
    writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    with pytest.raises(SlmError, match="architecture 'gpt2' is not supported"):
        load(str(_minimal_gguf(tmp_path / "g.gguf", arch="gpt2")))


def test_unsupported_tensor_type(tmp_path):
    from slmkit.interop.gguf import dequantize, open_gguf

    reader = open_gguf(_minimal_gguf(tmp_path / "f64.gguf", tensor_type=Q.F64))
    with pytest.raises(SlmError, match="type F64"):
        dequantize(reader.tensors[0])


def test_a_model_in_ollamas_store_loads_by_name(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """`ollama:NAME[:TAG]` finds the GGUF blob through Ollama's manifest (no network, no Ollama)."""
    import hashlib
    import json

    from slmkit.cli import main

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, name="tiny-pulled")
    model = random_model(config, seed=3)
    gguf_file = write_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "f32")
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    store = tmp_path / "store"
    (store / "blobs").mkdir(parents=True)
    gguf_file.rename(store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "0.1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    loaded = load("ollama:tiny:0.1b", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids))
    assert main(["info", "ollama:tiny:0.1b"]) == 0 and "tiny-pulled" in capsys.readouterr().out
    with pytest.raises(SlmError, match="Ollama has not pulled 'tiny'.*ollama pull tiny"):
        load("ollama:tiny")  # the tag defaults to latest, which is not there

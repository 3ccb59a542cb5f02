"""Every model family slmkit reads, against its peers: a tiny random checkpoint per family, made by
transformers in the test (offline, seconds) in odd shapes (heads that are not powers of two, GQA,
head_dim independent of hidden, a sliding window shorter than the prompt), then
(a) our logits equal transformers' on a prompt longer than the window;
(b) our HF export loads in transformers as the same family, with the same logits;
(c) our GGUF export (f32 and q8_0) runs in llama.cpp with our greedy tokens and next-token
    distributions, and imports back to the same model;
(d) a LoRA adapter trained a few steps loads in peft over transformers' model of our export;
(e) int4 quantization and Wanda pruning run on it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_CPP_MISSING

from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.gguf import write_gguf
from slmkit.interop.hf import save_hf
from slmkit.load import load, load_tokenizer

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=49152, intermediate_size=160, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=None, num_hidden_layers=2)
WINDOW = 8
SHARP = 8.0
PROMPT = 24  # tokens: longer than the window
# Per family: transformers' config kwargs, exercising what the family adds to a Llama block.
FAMILIES = {
    "llama": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                  attention_bias=True, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW),
    "qwen2": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True,
                  sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                  max_position_embeddings=1024,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                   "original_max_position_embeddings": 256}),
    "gemma": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "gemma2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
                   query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=4.0,
                   final_logit_softcapping=100.0),
    "gemma3_text": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32, num_hidden_layers=4,
                        query_pre_attn_scalar=16, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
    "phi": dict(hidden_size=96, num_attention_heads=6, partial_rotary_factor=0.5, hidden_act="gelu_new",
                resid_pdrop=0.0, embd_pdrop=0.0),
    "phi3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.5,
                 max_position_embeddings=1024, original_max_position_embeddings=256, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.5, 5.0, 6.5]}),
    "olmo2": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-6, rope_theta=5e5),
    "granite": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, embedding_multiplier=12.0,
                    residual_multiplier=0.22, attention_multiplier=0.1, logits_scaling=8.0, tie_word_embeddings=True,
                    rope_theta=1e7),
    "smollm3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=4,
                    no_rope_layer_interval=4, rope_theta=5e6, tie_word_embeddings=True),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every feature matter (HF's init leaves biases and Gemma's norms at zero)."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if gemma else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _sharpen(model: torch.nn.Module) -> None:
    """Logits SHARP times larger (the final norm's scale), so that greedy decoding meets few near-ties
    for two engines' rounding to decide differently."""
    norm = model.model.norm
    with torch.no_grad():
        offset = getattr(norm, "offset", 0.0)  # Gemma's norms apply 1 + w
        norm.weight.copy_((norm.weight + offset) * SHARP - offset)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(SHARP)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, smollm_tokenizer):
    """(model_type, transformers' model, its HF directory with SmolLM2's tokenizer)."""
    kind = request.param
    config = transformers.AutoConfig.for_model(kind, **{**COMMON, **FAMILIES[kind]})
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _randomize(hf.eval(), seed=len(kind))
    path = tmp_path_factory.mktemp(kind) / "hf"
    hf.save_pretrained(path)
    smollm_tokenizer.save(path)
    return kind, hf, path


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers_on_a_prompt_longer_than_the_window(family):
    kind, hf, path = family
    ours = load(str(path), dtype=torch.float32)
    assert ours.model.config.model_type == kind
    lengths = [PROMPT] + ([300] if kind == "phi3" else [])  # LongRoPE switches to its long factors after 256
    with torch.no_grad():
        for n in lengths:
            ids = _ids(n)
            torch.testing.assert_close(ours.model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_hf_export_loads_in_transformers_as_the_same_family(family, tmp_path):
    kind, hf, path = family
    ours = load(str(path), dtype=torch.float32)
    save_hf(ours.model, ours.tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    assert type(again) is type(hf)
    ids = _ids(PROMPT, 1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)


def _llamacpp():
    llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
    if not llamacpp.available():
        pytest.skip(LLAMA_CPP_MISSING)
    return llamacpp


def _compare(engine, reference, prompt: list[int], new: int, tie: float) -> dict:
    """llama.cpp against `reference` (ours, on the same weights) over our greedy continuation: the KL
    per position, whether llama.cpp picks our token wherever our top-2 margin exceeds `tie` (what
    rounding may flip), and its own greedy tokens against ours up to the first such near-tie."""
    expected = Engine(reference).generate([prompt], SamplingParams(max_new_tokens=new))[0].tokens
    seq = prompt + expected
    theirs = engine.tail_logits(seq[:-1], len(expected)).float().log_softmax(-1)
    with torch.no_grad():
        mine = reference(torch.tensor([seq]))[0, len(prompt) - 1:-1].float().log_softmax(-1)
    top2 = mine.topk(2).values
    decisive = (top2[:, 0] - top2[:, 1]) >= tie
    first_tie = int((~decisive).nonzero()[0]) if not decisive.all() else len(expected)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=new))[0].tokens
    return {"kl": (mine.exp() * (mine - theirs)).sum(-1), "decisive": decisive,
            "same_choice": (theirs.argmax(-1) == mine.argmax(-1))[decisive],
            "free": free[:first_tie] == expected[:first_tie], "first_tie": first_tie, "n": len(expected)}


# What llama.cpp rounds: f32 files run with an f16 KV cache and a GELU table; q8_0 rounds activations to
# 8 bits in its dot products (logits here are sharpened SHARP times, and so are its errors). Limits on the mean KL
# per token, with headroom over the largest measured (README, "Families"); a near-tie is a top-2
# log-prob margin below TIE.
KL_LIMIT = {"f32": 2e-3, "q8_0": 0.2}
TIE = {"f32": 0.05, "q8_0": 1.0}


@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_gguf_export_runs_in_llama_cpp_like_slmkit_and_imports_back(family, tmp_path, file_type):
    from slmkit.interop.gguf import exported_context, gguf_spec

    llamacpp = _llamacpp()
    kind, hf, path = family
    ours = load(str(path), dtype=torch.float32)
    _sharpen(ours.model)
    gguf = write_gguf(ours.model, ours.tokenizer, tmp_path / f"{kind}-{file_type}.gguf", file_type)
    again = load(str(gguf), dtype=torch.float32)
    context = min(64, exported_context(ours.model.config, gguf_spec(ours.model.config)))
    assert again.model.config.max_position_embeddings >= context
    if file_type == "f32":  # the import is the same model (Gemma's scale may now live in q: compare outputs)
        ids = _ids(min(PROMPT, context), 2)
        with torch.no_grad():
            torch.testing.assert_close(again.model(ids), ours.model(ids), rtol=0, atol=1e-4)
    assert again.tokenizer.encode("A robot counts 1, 2, 3.") == ours.tokenizer.encode("A robot counts 1, 2, 3.")
    prompt = _ids(min(PROMPT, context // 2), 3)[0].tolist()
    engine = llamacpp.LlamaCppEngine(gguf, again.model.config, max_seq_len=context)
    got = _compare(engine, again.model, prompt, context - len(prompt), TIE[file_type])
    print(f"{kind} {file_type}: KL mean {got['kl'].mean():.2e} max {got['kl'].max():.2e}, "
          f"{int(got['decisive'].sum())}/{got['n']} decisive, first near-tie at {got['first_tie']}")
    assert got["kl"].mean() < KL_LIMIT[file_type], got["kl"]
    assert got["decisive"].float().mean() >= 0.5  # the comparison is not vacuous
    if file_type == "f32":  # the same tokens wherever rounding cannot decide; batched rows as alone
        assert got["same_choice"].all() and got["free"]
        prompts, params = [prompt, prompt[: len(prompt) // 2]], SamplingParams(max_new_tokens=context - len(prompt))
        alone = [engine.generate([p], params)[0].tokens for p in prompts]
        together = llamacpp.LlamaCppEngine(gguf, again.model.config, max_seq_len=context, sequences=2)
        assert [g.tokens for g in together.generate(prompts, params)] == alone
    else:  # 8-bit activations: a documented KL, and nearly always the same choice
        assert got["same_choice"].float().mean() >= 0.9


def test_a_lora_adapter_trained_here_loads_in_peft_over_transformers_with_the_same_logits(family, tmp_path,
                                                                                         smollm_tokenizer):
    """PEFT applies our adapter (module names and fusions of the family's transformers class) over
    transformers' model of our export; it comes back into slmkit unchanged."""
    import warnings

    from slmkit.adapters.lora import LoraConfig, add_lora
    from slmkit.data.loader import Layout
    from slmkit.data.sft import Example, encode_all
    from slmkit.data.sft_batches import ExampleBatches
    from slmkit.interop.peft import save_adapter
    from slmkit.train.loop import TrainConfig, train
    from slmkit.train.losses import masked_lm_loss

    peft = pytest.importorskip("peft")
    kind, _hf, path = family
    base = load(str(path), dtype=torch.float32)
    save_hf(base.model, base.tokenizer, tmp_path / "base")
    model = base.model
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), torch.Generator().manual_seed(0))
    examples = [Example(messages=[{"role": "user", "content": f"Count to {i}."},
                                  {"role": "assistant", "content": ", ".join(str(j) for j in range(i))}])
                for i in range(3, 11)]
    encoded, _ = encode_all(examples, smollm_tokenizer, 64)
    cfg = TrainConfig(steps=3, micro_batch_size=4, seq_len=63, lr=3e-2, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, precision="fp32", eval_every=0, checkpoint_every=0)
    train(model, ExampleBatches(encoded, 63, Layout(4, 1), seed=0), cfg, tmp_path / "run", smollm_tokenizer,
          loss_fn=masked_lm_loss)
    save_adapter(model.eval(), tmp_path / "adapter", str(tmp_path / "base"), smollm_tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager",
                                                           dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:  # PEFT only warns about keys it could not place
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    ids = _ids(PROMPT, 4)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(theirs(ids).logits, ours, rtol=0, atol=1e-4)
        again = load(str(tmp_path / "adapter"), dtype=torch.float32).model
        torch.testing.assert_close(again(ids), ours, rtol=0, atol=1e-5)
        plain = load(str(tmp_path / "base"), dtype=torch.float32).model
        assert (plain(ids) - ours).abs().max() > 1e-3  # the adapter changes the model: the comparison says something


@pytest.mark.parametrize("method", ["int4", "wanda"])
def test_int4_and_wanda_run_on_every_family(family, method, tmp_path):
    """Quantization and pruning see the same linears in every family (Phi-2's plain MLP has no gate);
    a quantized checkpoint of a renaming or fusing family comes back as it was saved."""
    from slmkit.compress.prune import PruneConfig, prune_model
    from slmkit.compress.quant.quantize import QuantConfig, quantize_model
    from slmkit.interop.hf import save_checkpoint

    kind, _hf, path = family
    model = load(str(path), dtype=torch.float32).model
    ids = _ids(PROMPT, 5)
    with torch.no_grad():
        before = model(ids)
    calib = torch.randint(3, 49152, (4, 32), generator=torch.Generator().manual_seed(6))
    if method == "wanda":
        report = prune_model(model, PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
        assert report.zeros / report.weights == pytest.approx(0.5, abs=0.01)
    else:
        quantize_model(model, QuantConfig(method=method, group_size=32), calib, progress=False)
    with torch.no_grad():
        after = model(ids)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    if method != "wanda":  # half of a random model's weights gone is no small change; 4-bit rounding is
        cosine = torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
        assert cosine > 0.8, cosine
        save_checkpoint(model, None, tmp_path / "q")
        with torch.no_grad():
            torch.testing.assert_close(load(str(tmp_path / "q"), dtype=torch.float32).model(ids), after)


def test_awq_scales_fold_into_every_familys_feeders_without_changing_the_float_model(family):
    """Each group's 1/s goes into what feeds it (Gemma's 1 + w norms, Phi-2's LayerNorm and its bias,
    up_proj before down_proj) and s into the group: the float model computes the same."""
    from slmkit.compress.quant.awq import apply_scales
    from slmkit.compress.quant.quantize import awq_feeders

    _kind, _hf, path = family
    model = load(str(path), dtype=torch.float32).model
    ids = _ids(PROMPT, 7)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        before = model(ids)
        folded = 0
        for block in model.model.layers:
            groups = {group[0]: group for group in block.input_groups()}
            for first, feeder in awq_feeders(block).items():
                linears = [block.get_submodule(n) for n in groups[first]]
                apply_scales(feeder, linears, torch.rand(linears[0].in_features, generator=g) * 1.5 + 0.5)
                folded += 1
        assert folded >= len(model.model.layers)
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)


def test_structured_pruning_gives_a_smaller_model_of_the_same_family(family, tmp_path):
    """MLP neurons and a layer go in every family (per-layer attention types and NoPE layers follow the
    kept layers); transformers loads the result as the same family with our logits. Hidden channels
    and heads go only where the family's arithmetic survives the cut, and are refused with the reason."""
    from slmkit.compress.structured import StructuredConfig, prune_structured
    from slmkit.errors import SlmError

    kind, _hf, path = family
    model = load(str(path), dtype=torch.float32).model
    c = model.config
    calib = torch.randint(3, 49152, (2, 32), generator=torch.Generator().manual_seed(9))
    # hidden channels: where RMSNorms allow it, in steps of the heads (Llama's and Gemma's classes need
    # hidden % heads == 0); not in Phi-3, whose class takes head_dim to be hidden / heads
    hidden = c.hidden_size - 4 * c.heads(0) if c.norm_type == "rms" and kind != "phi3" else None
    pruned, _ = prune_structured(model, StructuredConfig(ffn=96, layers=c.num_hidden_layers - 1, hidden=hidden),
                                 calib, progress=False)
    assert pruned.config.ffn_size(0) == 96 and pruned.config.num_hidden_layers == c.num_hidden_layers - 1
    save_hf(pruned, None, tmp_path / "pruned")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    assert theirs.config.model_type == kind
    ids = _ids(PROMPT, 10)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, pruned(ids), rtol=0, atol=1e-4)
    if c.norm_type != "rms":
        with pytest.raises(SlmError, match="--hidden cannot prune"):
            prune_structured(model, StructuredConfig(hidden=c.hidden_size - 32), calib, progress=False)
    if c.qk_norm == "projection":
        with pytest.raises(SlmError, match="--heads/--kv-heads cannot prune"):
            prune_structured(model, StructuredConfig(kv_heads=1), calib, progress=False)


def test_a_lora_adapter_runs_in_llama_cpp_as_an_adapter_file(family, tmp_path):
    """`slm export gguf-lora` for every family: llama.cpp applies our adapter file over our base export
    (q/k rows permuted where its RoPE pairs dims, Gemma 2's scale folded into q, Phi-3's [gate; up]
    adapted block-diagonally) and follows slmkit with the adapter."""
    from slmkit.adapters.lora import LoraConfig, add_lora, lora_layers
    from slmkit.interop.gguf import exported_context, gguf_spec
    from slmkit.interop.gguf_lora import write_gguf_lora

    llamacpp = _llamacpp()
    kind, _hf, path = family
    loaded = load(str(path), dtype=torch.float32)
    model = loaded.model
    _sharpen(model)
    base = write_gguf(model, loaded.tokenizer, tmp_path / "base.gguf", "f32")
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["all-linear"]), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    adapter = write_gguf_lora(model.eval(), tmp_path / "adapter.gguf")
    context = min(48, exported_context(model.config, gguf_spec(model.config)))
    engine = llamacpp.LlamaCppEngine(base, model.config, max_seq_len=context, lora=adapter)
    prompt = _ids(min(PROMPT, context // 2), 11)[0].tolist()
    got = _compare(engine, model, prompt, min(16, context - len(prompt)), TIE["f32"])
    assert got["kl"].mean() < KL_LIMIT["f32"], got["kl"]
    assert got["same_choice"].all() and got["free"]


@pytest.mark.parametrize("family", ["gemma3_text", "phi", "olmo2"], indirect=True)
def test_the_verbs_run_on_the_families_least_like_llama(family, tmp_path, capsys):
    """From the command line, on Gemma 3 (sandwich block, 1 + w norms), Phi-2 (parallel block,
    LayerNorm, renamed linears) and OLMo-2 (post-norm, q/k norms over the projection): info,
    generate on both engines, GPTQ, SparseGPT, low-rank and its densified GGUF export."""
    from slmkit.cli import main

    kind, _hf, path = family
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000.\n" * 40)
    calib_args = ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "32"]
    assert main(["info", str(path)]) == 0 and kind in capsys.readouterr().out
    engines = ["torch"] + (["llamacpp"] if pytest.importorskip("slmkit.infer.llamacpp").available() else [])
    for engine in engines:
        assert main(["generate", str(path), "Once upon", "--max-tokens", "4", "--engine", engine]) == 0
    assert main(["quantize", str(path), "--method", "gptq", "--group-size", "32", *calib_args,
                 "-o", str(tmp_path / "gptq")]) == 0
    assert main(["generate", str(tmp_path / "gptq"), "Once upon", "--max-tokens", "4"]) == 0
    assert main(["prune", str(path), "--method", "sparsegpt", "--sparsity", "0.5", *calib_args,
                 "-o", str(tmp_path / "sparse")]) == 0
    assert main(["lowrank", str(path), "--keep", "0.6", *calib_args, "-o", str(tmp_path / "lowrank")]) == 0
    assert main(["export", "gguf", str(tmp_path / "lowrank"), str(tmp_path / "lowrank.gguf"), "--type", "f32",
                 "--densify"]) == 0
    assert main(["generate", str(tmp_path / "lowrank.gguf"), "Once upon", "--max-tokens", "4"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling type 'dynamic' is not supported"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"model_type": "qwen2", "layer_types": ["chunked_attention", "full_attention"]},
     r"layer_types holds \['chunked_attention'\]"),
    ({"model_type": "gpt_oss"}, "model_type 'gpt_oss' is not supported .*gemma3_text"),
])
def test_what_slmkit_does_not_implement_is_refused_by_name(tmp_path, changes, message):
    from slmkit.errors import SlmError
    from slmkit.load import inspect

    config = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlmError, match=message):
        inspect(str(tmp_path))


def test_every_family_preset_is_written_as_its_family():
    """The presets' switches are their families' (a wrong one would be written as another class)."""
    from slmkit.interop.families import export_family
    from slmkit.presets import PRESETS

    for name, preset in PRESETS.items():
        if preset.published_params and preset.config.is_uniform:  # OpenELM's per-layer widths are slmkit's own
            assert export_family(preset.config).model_type == preset.config.model_type, name


@pytest.mark.parametrize("family,method", [("phi3", "dora"), ("phi", "dora"), ("gemma3_text", "qlora")],
                         indirect=["family"])
def test_slm_finetune_trains_dora_and_qlora_on_families_whose_files_differ(family, method, tmp_path):
    """The recipe over the fused (Phi-3) and renamed (Phi-2) families with DoRA, whose adapters peft
    applies over transformers' model (DoRA's magnitudes joined like the linears), and QLoRA over
    Gemma 3 packed to int4."""
    import yaml

    from slmkit.adapters.lora import lora_layers
    from slmkit.config import load_config
    from slmkit.train.finetune import FinetuneConfig, run

    kind, _hf, path = family
    rows = [{"messages": [{"role": "user", "content": f"Is robot {i} even?"},
                          {"role": "assistant", "content": "yes" if i % 2 == 0 else "no!"}]} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"base": str(path), "method": method, "out": str(tmp_path / "run"), "epochs": 0,
              "data": {"train": str(tmp_path / "data.jsonl")}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "quant": {"method": "int4", "group_size": 32, "lm_head": False},
              "train": {"steps": 3, "micro_batch_size": 4, "seq_len": 32, "lr": 2e-2, "warmup_steps": 0,
                        "eval_every": 3, "checkpoint_every": 3, "precision": "fp32"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run(load_config(FinetuneConfig, tmp_path / "recipe.yaml"))
    tuned = load(str(tmp_path / "run"), dtype=torch.float32).model
    assert lora_layers(tuned) and all(layer.dora == (method == "dora") for _, layer in lora_layers(tuned))
    ids = _ids(PROMPT, 12)
    with torch.no_grad():
        ours = tuned(ids)
    assert torch.isfinite(ours).all()
    if method == "dora":
        peft = pytest.importorskip("peft")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run")).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours, rtol=0, atol=1e-4)


def test_kv_cache_decoding_and_left_padded_batches_equal_the_full_forward_pass(family):
    """Sliding windows, local RoPE bases, NoPE layers and LongRoPE through the static cache, and rows
    of different lengths decoded together as each alone."""
    _kind, _hf, path = family
    model = load(str(path), dtype=torch.float32).model
    ids = _ids(30, 13)
    with torch.no_grad():
        full = model(ids)
        cache, parts, at = model.new_cache(1, 64), [], 0
        for n in (7, 1, 1, 14, 7):
            parts.append(model(ids[:, at:at + n], cache=cache))
            at += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-4)
    _sharpen(model)
    prompts = [_ids(n, n)[0].tolist() for n in (5, 17, 30)]
    params = SamplingParams(max_new_tokens=12)
    alone = [Engine(model).generate([p], params)[0].tokens for p in prompts]
    assert [g.tokens for g in Engine(model).generate(prompts, params)] == alone


# ExecuTorch exports take ~10 s each here: three families least like Llama run in every suite, the rest
# with the slow checks (`make bench`).
EXECUTORCH_EVERY_RUN = ("gemma2", "phi", "smollm3")


@pytest.mark.parametrize("family", [k if k in EXECUTORCH_EVERY_RUN else pytest.param(k, marks=pytest.mark.slow)
                                    for k in FAMILIES], indirect=True)
def test_an_executorch_program_gives_our_logits_on_every_family(family, tmp_path):
    """The fp32 .pte (static cache, custom SDPA or the masked path for windows and soft caps) against our
    model, teacher-forced: a prompt read in one call, then token by token past the sliding window."""
    from slmkit.interop.executorch import executorch_missing
    from slmkit.jobs.export import ExecutorchJob, run_executorch

    if executorch_missing():
        pytest.skip(executorch_missing())
    from slmkit.infer.executorch_runtime import ExecuTorchEngine

    _kind, _hf, path = family
    model = load(str(path), dtype=torch.float32).model
    pte = run_executorch(ExecutorchJob(str(path), str(tmp_path / "m.pte"), "fp32", max_seq_len=2 * PROMPT),
                         log=lambda *_: None)
    engine = ExecuTorchEngine(pte)
    ids = _ids(PROMPT + 8, 14)[0].tolist()
    rows = [engine.forward(ids[:PROMPT], 0)[0]] + [engine.forward([t], i)[0] for i, t in enumerate(ids[PROMPT:], PROMPT)]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids]))[0, PROMPT - 1:], -1)
    # XNNPACK sums in its own order (and approximates GELU): log-probabilities of -10 to -20 agree to 5e-3
    torch.testing.assert_close(torch.log_softmax(torch.stack(rows), -1), want, rtol=0, atol=5e-3)

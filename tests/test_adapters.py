"""LoRA / DoRA adapters, defined by their peers: PEFT loads ours and we load PEFT's with the same
logits, training matches peft + transformers step for step, llama.cpp applies our GGUF adapter and
continues like slmkit; QLoRA trains only the adapter over a packed base it leaves bit-identical."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import LLAMA_CPP_MISSING

from slmkit.adapters.lora import LoraConfig, LoRALinear, add_lora, lora_layers
from slmkit.adapters.merge import merge_adapters, with_adapter_copy
from slmkit.compress.quant.qlinear import Int4Linear, Int8Linear
from slmkit.compress.quant.quantize import QuantConfig, quantize_model
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.hf import save_hf
from slmkit.interop.peft import save_adapter
from slmkit.load import load, random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def _adapted(seed: int = 0, dora: bool = False, rslora: bool = False, layers=(), **changes):
    """A tiny model with a trained-looking adapter (B non-zero, DoRA magnitudes moved)."""
    model = random_model(TINY.replace(**changes), seed=seed)
    add_lora(model, LoraConfig(r=4, alpha=8, dora=dora, rslora=rslora, layers=list(layers)),
             torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05, generator=g)
            if dora:
                layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, generator=g) + 0.5)
    return model.eval()


def _peft_load(base_dir, adapter_dir):
    """PeftModel over transformers' model of our HF export; PEFT only warns on missing keys, so any
    warning about keys fails the test."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return model


@pytest.mark.parametrize("dora,rslora", [(False, False), (True, False), (False, True)])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, tiny_tokenizer, dora, rslora):
    model = _adapted(dora=dora, rslora=rslora)
    base = random_model(TINY, seed=0)
    save_hf(base, tiny_tokenizer, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), tiny_tokenizer)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == dora and config["use_rslora"] == rslora
    ids = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids), _peft_load(tmp_path / "base", tmp_path / "adapter")(ids).logits
        assert (ours - base(ids)).abs().max() > 1e-2  # the adapter matters
    assert (ours - theirs).abs().max() <= 1e-4


def test_an_adapter_of_the_top_blocks_only_is_peft_layers_to_transform(tmp_path, tiny_tokenizer):
    model = _adapted(layers=[-1], num_hidden_layers=3)
    assert {name.split(".")[2] for name, _ in lora_layers(model)} == {"2"}
    base = random_model(TINY.replace(num_hidden_layers=3), seed=0)
    save_hf(base, tiny_tokenizer, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), tiny_tokenizer)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2] and config["layers_pattern"] == "layers"
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - _peft_load(tmp_path / "base", tmp_path / "adapter")(ids).logits).abs().max() <= 1e-4
    with pytest.raises(SlmError, match="outside this model's 3 blocks"):
        add_lora(random_model(TINY.replace(num_hidden_layers=3)), LoraConfig(layers=[3]))


@pytest.mark.parametrize("dora", [False, True])
def test_a_peft_adapter_loads_in_slmkit_with_the_same_logits(tmp_path, dora):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     use_dora=dora))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.eval().save_pretrained(tmp_path / "adapter")
    ours = load(str(tmp_path / "adapter"), base=str(tmp_path / "base")).model
    assert len(lora_layers(ours)) == 6 and all(layer.dora == dora for _, layer in lora_layers(ours))
    ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_training_matches_peft_and_transformers_step_for_step(tmp_path, tiny_tokenizer):
    """Same base, same LoRA init, same batches: the first 5 losses agree within 1e-4 (fp32)."""
    from slmkit.data.loader import Layout
    from slmkit.data.sft import Example, encode_all
    from slmkit.data.sft_batches import IGNORE, ExampleBatches
    from slmkit.train.loop import TrainConfig, train
    from slmkit.train.losses import masked_lm_loss

    base = random_model(TINY, seed=0)
    save_hf(base, tiny_tokenizer, tmp_path / "base")
    examples = [Example(messages=[{"role": "user", "content": f"count {i}"},
                                  {"role": "assistant", "content": "1, 2, 3" * (1 + i % 3)}]) for i in range(40)]
    encoded, _ = encode_all(examples, tiny_tokenizer, 128)
    batches = ExampleBatches(encoded, 127, Layout(4, 1), seed=0)
    cfg = TrainConfig(steps=5, micro_batch_size=4, seq_len=127, lr=1e-2, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, grad_clip=1.0, precision="fp32", eval_every=0, checkpoint_every=0)
    names = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), torch.Generator().manual_seed(0))
    init_a = {n: layer.lora_A.weight.detach().clone() for n, layer in lora_layers(base)}
    train(base, batches, cfg, tmp_path / "run", tiny_tokenizer, loss_fn=masked_lm_loss)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in rows if r["kind"] == "train"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name in names:
            model.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.copy_(init_a[name])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    model.train()
    theirs = []
    for step in range(5):
        batch = batches.batch(step, 0)
        keep = batch["targets"] != IGNORE
        logits = model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), batch["targets"][keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
    assert len(ours) == 5 and ours[-1] < ours[0]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4, (ours, theirs)


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_qlora_trains_only_the_adapter_and_leaves_the_packed_base_bit_identical(tmp_path, tiny_tokenizer, bits):
    from slmkit.data.loader import Layout
    from slmkit.data.sft import Example, encode_all
    from slmkit.data.sft_batches import ExampleBatches
    from slmkit.train.loop import TrainConfig, train
    from slmkit.train.losses import masked_lm_loss

    model = random_model(TINY, seed=0)
    quantize_model(model, QuantConfig(method=bits, group_size=32, lm_head=False), progress=False)
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(r=4, alpha=8), torch.Generator().manual_seed(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = [Example(prompt=f"robot {i}: ", completion="1, 2, 3, 42") for i in range(16)]
    encoded, _ = encode_all(examples, tiny_tokenizer, 64)
    cfg = TrainConfig(steps=4, micro_batch_size=4, seq_len=63, lr=1e-2, warmup_steps=0, precision="fp32",
                      eval_every=0, checkpoint_every=0)
    train(model, ExampleBatches(encoded, 63, Layout(4, 1), seed=0), cfg, tmp_path / "run", tiny_tokenizer,
          loss_fn=masked_lm_loss, files=_adapter_files())
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(after) == set(packed)
    assert all(torch.equal(after[k], packed[k]) for k in packed)  # codes, scales, zeros, norms, embedding
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before and "lora_B" in n)
    assert any(isinstance(m, Int4Linear if bits == "int4" else Int8Linear) for m in model.modules())


def _adapter_files():
    from slmkit.interop.peft import restore_adapter
    from slmkit.train.checkpoint import ModelFiles

    return ModelFiles(lambda m, tok, path: save_adapter(m, path, "tiny", tok), restore_adapter,
                      ("adapter_config.json", "adapter_model.safetensors"))


@pytest.mark.parametrize("dora", [False, True])
def test_merging_a_float_base_keeps_the_outputs(dora):
    model = _adapted(dora=dora)
    ids = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        before = model(ids)
        report = merge_adapters(model)
        after = model(ids)
    assert report.merged == 14 and not lora_layers(model)
    assert (before - after).abs().max() <= 1e-4


def test_merging_a_quantized_base_requantizes_and_reports_the_rounding():
    model = random_model(TINY, seed=0)
    quantize_model(model, QuantConfig(method="int4", group_size=32, lm_head=False), progress=False)
    add_lora(model, LoraConfig(r=4, alpha=8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        before = model.eval()(ids).softmax(-1)
        report = merge_adapters(model)
        after = model(ids).softmax(-1)
    assert report.requantized == 14 and 0 < min(report.lost) and max(report.lost) < 1
    assert all(isinstance(m, Int4Linear) for n, m in model.named_modules() if n.endswith("proj"))
    assert (before - after).abs().max() < 0.05  # close, not equal: the rounding is the reported cost
    assert "requantized" in report.summary()


def test_adapters_over_one_base_share_its_weights():
    model = random_model(TINY, seed=0)
    copy = with_adapter_copy(model)
    add_lora(copy, LoraConfig(r=4), torch.Generator().manual_seed(0))
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight
    layer = copy.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.base_layer.weight is model.model.layers[0].self_attn.q_proj.weight
    assert not lora_layers(model)


def test_bad_adapter_settings_fail_before_any_change():
    model = random_model(TINY, seed=0)
    with pytest.raises(SlmError, match=r"unknown lora target 'qproj'.*q_proj"):
        add_lora(model, LoraConfig(targets=["qproj"]))
    with pytest.raises(SlmError, match="larger than the width"):
        add_lora(model, LoraConfig(r=65, targets=["q_proj"]))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_an_adapter_over_the_wrong_base_is_refused(tmp_path, tiny_tokenizer):
    model = _adapted()
    save_adapter(model, tmp_path / "adapter", "tiny", tiny_tokenizer)
    other = random_model(TINY.replace(hidden_size=32, intermediate_size=64), seed=0)
    save_hf(other, tiny_tokenizer, tmp_path / "other")
    with pytest.raises(SlmError, match="trained on another base: hidden_size 64"):
        load(str(tmp_path / "adapter"), base=str(tmp_path / "other"))
    # a PEFT-written adapter has no facts file: the shapes catch it
    (tmp_path / "adapter" / "slmkit_adapter.json").unlink()
    with pytest.raises(SlmError, match="belongs to another base"):
        load(str(tmp_path / "adapter"), base=str(tmp_path / "other"))


def test_llama_cpp_applies_our_gguf_adapter_and_continues_like_slmkit(tmp_path, smollm):
    """Our f32 GGUF of SmolLM2 plus our GGUF LoRA adapter, run by llama.cpp, continue a prompt
    greedily for 32 tokens exactly as slmkit does with the adapter (fp32)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from slmkit.generate import TextGenerator
    from slmkit.infer.sampling import SamplingParams
    from slmkit.interop.gguf import write_gguf
    from slmkit.interop.gguf_lora import write_gguf_lora

    base = with_adapter_copy(smollm.model)
    write_gguf(base, smollm.tokenizer, tmp_path / "base.gguf", "f32")
    add_lora(base, LoraConfig(r=8, alpha=16), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(base):
            layer.lora_B.weight.normal_(0, 0.02, generator=g)
    write_gguf_lora(base, tmp_path / "adapter.gguf")
    prompt = smollm.tokenizer.encode("The three primary colors are")
    ours = TextGenerator(base.eval(), smollm.tokenizer).engine.generate([prompt], SamplingParams(max_new_tokens=32))[0]
    plain = TextGenerator(smollm.model, smollm.tokenizer).engine.generate([prompt], SamplingParams(max_new_tokens=32))[0]
    assert ours.tokens != plain.tokens  # the adapter changes the continuation
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"),
                          n_ctx=128, n_threads=2, verbose=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == len(ours.tokens):
            break
    assert len(ours.tokens) == 32 and theirs == ours.tokens


def test_gguf_adapter_refuses_what_llama_cpp_cannot_apply(tmp_path):
    from slmkit.interop.gguf_lora import write_gguf_lora

    with pytest.raises(SlmError, match="no DoRA"):
        write_gguf_lora(_adapted(dora=True), tmp_path / "a.gguf")
    tied_head = random_model(TINY, seed=0)
    add_lora(tied_head, LoraConfig(r=4, targets=["lm_head"]))
    with pytest.raises(SlmError, match="ties to its embedding"):
        write_gguf_lora(tied_head, tmp_path / "b.gguf")


def test_serve_holds_one_base_for_several_adapters_and_answers_with_each(tmp_path, tiny_tokenizer):
    """`slm serve base=BASE a=ADAPTER b=ADAPTER`: three model names, one copy of the base weights,
    and each name answers with its own adapter (driven by the official openai client)."""
    from serving import served

    from slmkit.runtime import Runtime
    from slmkit.serve.config import ServeConfig
    from slmkit.serve.run import build_backends

    base = random_model(TINY, seed=0)
    save_hf(base, tiny_tokenizer, tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(_adapted(seed=seed), tmp_path / name, str(tmp_path / "base"), tiny_tokenizer)
    cfg = ServeConfig(models=[f"base={tmp_path / 'base'}", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"],
                      max_batch=4, max_queue=8, runtime=Runtime(dtype="float32", engine="torch"))
    backends = build_backends(cfg)
    models = {name: backends[name].scheduler.runner.model for name in ("base", "a", "b")}
    embed = models["base"].model.embed_tokens.weight
    assert all(m.model.embed_tokens.weight is embed for m in models.values())
    q = [m.model.layers[0].self_attn.q_proj for m in models.values()]
    assert not isinstance(q[0], LoRALinear) and all(layer.base_layer.weight is q[0].weight for layer in q[1:])
    with served(backends) as srv:
        client = srv.client()
        assert {m.id for m in client.models.list().data} == {"base", "a", "b"}
        answers = {name: client.completions.create(model=name, prompt="robot 42", max_tokens=8, temperature=0).choices[0].text
                   for name in ("base", "a", "b")}
    expected = {}
    for name in ("a", "b"):
        direct = load(str(tmp_path / name), dtype=torch.float32)
        from slmkit.generate import TextGenerator
        from slmkit.infer.sampling import SamplingParams

        expected[name] = TextGenerator(direct.model, direct.tokenizer).complete(
            ["robot 42"], SamplingParams(max_new_tokens=8))[0].text
    assert answers["a"] == expected["a"] and answers["b"] == expected["b"] and answers["a"] != answers["b"]


def test_cli_merge_export_and_info_take_an_adapter_directory(tmp_path, tiny_tokenizer):
    import os
    import subprocess
    import sys

    import gguf

    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    model = _adapted()
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), tiny_tokenizer)
    merged = slm("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert "merged 14 adapted linears" in merged.stdout
    ids = torch.randint(0, TINY.vocab_size, (1, 11))
    with torch.no_grad():
        assert (load(str(tmp_path / "merged")).model(ids) - model(ids)).abs().max() <= 1e-4
    exported = slm("export", "gguf-lora", str(tmp_path / "adapter"), str(tmp_path / "adapter.gguf"))
    assert exported.returncode == 0, exported.stderr
    reader = gguf.GGUFReader(str(tmp_path / "adapter.gguf"))
    fields = {k: reader.fields[k] for k in ("general.type", "adapter.type", "adapter.lora.alpha")}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names and len(names) == 28
    info = slm("info", str(tmp_path / "adapter"))
    assert info.returncode == 0 and "64" in info.stdout
    dora = _adapted(dora=True)
    save_adapter(dora, tmp_path / "dora", str(tmp_path / "base"), tiny_tokenizer)
    refused = slm("export", "gguf-lora", str(tmp_path / "dora"), str(tmp_path / "dora.gguf"))
    assert refused.returncode == 2 and "no DoRA" in refused.stderr and not (tmp_path / "dora.gguf").exists()

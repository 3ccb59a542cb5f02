"""The llama.cpp runtime: the same greedy tokens as the torch engine on the same weights, batched
rows equal to solo rows, prefix reuse, and the export cache (reused, rebuilt when damaged)."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_CPP_MISSING

from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.gguf import write_gguf
from slmkit.interop.hf import save_hf
from slmkit.load import load, random_model
from slmkit.presets import get_preset

llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
if not llamacpp.available():
    pytest.skip(LLAMA_CPP_MISSING, allow_module_level=True)

PROMPTS = [[5, 17, 33, 2, 101, 7, 9], list(range(20, 60)), [7] * 11]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with sharp logits (near-ties flip with any kernel's rounding), as an HF
    directory and as an f32 GGUF."""
    model = random_model(get_preset("tiny").config, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    root = tmp_path_factory.mktemp("tiny")
    save_hf(model, tiny_tokenizer, root / "hf")
    return model, write_gguf(model, tiny_tokenizer, root / "tiny-f32.gguf", "f32"), root / "hf"


def test_greedy_tokens_equal_the_torch_engine_and_batched_rows_equal_solo(tiny):
    model, gguf, _ = tiny
    params = SamplingParams(max_new_tokens=32, repetition_penalty=1.2, frequency_penalty=0.3, logit_bias={9: 2.0})
    expected = [Engine(model).generate([p], params)[0].tokens for p in PROMPTS]
    solo = llamacpp.LlamaCppEngine(gguf, model.config, max_seq_len=256)
    assert [solo.generate([p], params)[0].tokens for p in PROMPTS] == expected
    together = llamacpp.LlamaCppEngine(gguf, model.config, max_seq_len=256, sequences=3)
    assert [g.tokens for g in together.generate(PROMPTS, params)] == expected
    # a longer prompt that starts with the last one reuses its cache and still matches a fresh engine
    longer = PROMPTS[2] + expected[2][:5]
    fresh = llamacpp.LlamaCppEngine(gguf, model.config, max_seq_len=256).generate([longer], params)[0].tokens
    assert solo.generate([longer], params)[0].tokens == fresh


def test_the_export_cache_is_reused_and_rebuilt_when_damaged(tiny, tmp_path, monkeypatch):
    model, _, hf = tiny
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    said = []
    files = llamacpp.runtime_files(str(hf), "q8_0", progress=said.append)
    gguf, config = files.gguf, files.config
    assert len(said) == 1 and gguf.is_file() and config.hidden_size == model.config.hidden_size and files.lora is None
    again = llamacpp.runtime_files(str(hf), "q8_0", progress=said.append).gguf
    assert again == gguf and len(said) == 1  # reused, not exported again
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    gguf.write_bytes(bytes(data))
    llamacpp.runtime_files(str(hf), "q8_0", progress=said.append)
    assert len(said) == 2  # rebuilt
    engine = llamacpp.LlamaCppEngine(gguf, config, max_seq_len=128)
    reference = Engine(load(str(gguf), dtype=torch.float32).model)
    params = SamplingParams(max_new_tokens=16)
    assert engine.generate([PROMPTS[0]], params)[0].tokens == reference.generate([PROMPTS[0]], params)[0].tokens


def test_a_model_llama_cpp_cannot_run_is_refused_with_the_torch_hint(tmp_path, tiny_tokenizer, monkeypatch):
    from slmkit.errors import SlmError

    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    save_hf(random_model(get_preset("tiny-elm").config), tiny_tokenizer, tmp_path / "per-layer")  # widths vary by layer
    with pytest.raises(SlmError, match="use --engine torch"):
        llamacpp.runtime_files(str(tmp_path / "per-layer"), "q8_0", progress=lambda _: None)


@torch.inference_mode()
def test_smollm2_q8_0_in_llama_cpp_follows_the_torch_engine(smollm, tmp_path):
    """On the same (dequantized) Q8_0 weights: llama.cpp's next-token distribution stays within a
    small KL of the torch engine's at every position of 32 greedy tokens, and picks the same token
    wherever torch's choice is not a near-tie (llama.cpp also rounds activations to 8 bits, which
    flips near-ties: 'The' vs 'L' after "What is the capital of France?" differ by 0.14 in its logits)."""
    path = write_gguf(smollm.model, smollm.tokenizer, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    reference = load(str(path), dtype=torch.float32).model
    engine = llamacpp.LlamaCppEngine(path, reference.config, max_seq_len=512)
    tok = smollm.tokenizer
    for question in ("What is the capital of France?", "Give me three tips for staying healthy."):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
        seq = ids + Engine(reference).generate([ids], SamplingParams(max_new_tokens=32))[0].tokens
        torch_logits = reference(torch.tensor([seq]))[0, len(ids) - 1:-1].float()  # (32, V): each new token
        ours = engine.tail_logits(seq[:-1], len(seq) - len(ids))  # the same 32 positions
        kl = torch.nn.functional.kl_div(ours.log_softmax(-1), torch_logits.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        assert kl.mean() < 0.01 and kl.max() < 0.05, kl
        top2 = torch_logits.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.5
        assert clear.sum() >= 16 and torch.equal(ours.argmax(-1)[clear], torch_logits.argmax(-1)[clear])


def test_eval_scores_on_llama_cpp_equal_the_torch_scorer(tiny, tiny_tokenizer):
    """The harness's rules on both runtimes, on an f32 GGUF of the same weights: shared contexts,
    contexts cut to fit, a continuation longer than the context, and greedy generation to a stop."""
    from slmkit.evals.lm import LlamaCppLM, LocalLM, LoglikelihoodRequest

    model, gguf, _ = tiny
    ours = LlamaCppLM(llamacpp.LlamaCppEngine(gguf, model.config, max_seq_len=48), tiny_tokenizer)
    reference = LocalLM(model, tiny_tokenizer, max_length=48)
    long_context = "the quick brown fox jumps over the lazy dog " * 8
    requests = [LoglikelihoodRequest("Question: what is red? Answer:", c) for c in (" apples", " the sky", " no")]
    requests += [LoglikelihoodRequest(long_context, " and runs"), LoglikelihoodRequest("x", " word" * 60)]
    got, expected = ours.loglikelihood(requests, False), reference.loglikelihood(requests, False)
    assert [s.truncated for s in got] == [s.truncated for s in expected] == [False] * 3 + [True, True]
    for a, b in zip(got, expected):
        assert a.tokens == b.tokens and a.greedy == b.greedy and a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=2e-3)
    prompts = ["Once upon a time", "Q: 1+1=?\nA:"]
    assert ours.generate_until(prompts, ["\n"], 12, False) == reference.generate_until(prompts, ["\n"], 12, False)


def test_eval_and_bench_run_on_llama_cpp_from_the_cli(tiny, data_dir, tmp_path):
    import json

    from slmkit.cli import main

    _, _, hf = tiny
    out = tmp_path / "eval.json"
    assert main(["eval", str(hf), "--engine", "llamacpp", "--gguf-type", "f16", "--tasks", "arc_easy", "--limit",
                 "3", "-o", str(out), "--data-dir", str(data_dir / "eval")]) == 0
    doc = json.loads(out.read_text())
    assert doc["model_info"]["engine"] == "llamacpp" and doc["model_info"]["gguf_type"] == "F16"
    assert doc["results"][0]["task"] == "arc_easy"
    assert main(["eval", str(hf), "--engine", "llamacpp", "--perplexity", str(out)]) == 2  # a torch-only option
    bench = tmp_path / "bench.json"
    assert main(["bench", str(hf), "--engine", "llamacpp", "--prompt-tokens", "16", "--new-tokens", "4", "--runs",
                 "1", "--batch", "1,2", "-o", str(bench)]) == 0
    row = json.loads(bench.read_text())["results"][0]
    assert row["engine"] == "llamacpp" and row["dtype"] == "q8_0" and set(row["batches"]) == {"1", "2"}
    assert row["batches"]["2"]["decode_tok_s"]["median"] > 0
    assert main(["bench", "tiny", "--engine", "llamacpp"]) == 2  # random weights: torch only


def test_a_lora_adapter_runs_as_a_llama_cpp_adapter_over_its_base_export(tiny, tiny_tokenizer, tmp_path,
                                                                          monkeypatch):
    """An adapter directory becomes the base's (shared, cached) GGUF plus a llama.cpp LoRA file; llama.cpp
    follows slmkit with the same adapter over the same exported base: next-token distributions within a
    small KL, the same greedy tokens up to the first near-tie."""
    from slmkit.adapters.lora import LoraConfig, add_lora, lora_layers
    from slmkit.adapters.merge import with_adapter_copy
    from slmkit.interop.peft import save_adapter

    model, _, hf = tiny
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    adapted = with_adapter_copy(model)
    add_lora(adapted, LoraConfig(r=4, alpha=8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_adapter(adapted, tmp_path / "adapter", str(hf), tiny_tokenizer)
    said = []
    files = llamacpp.runtime_files(str(tmp_path / "adapter"), "f16", progress=said.append)
    assert files.lora is not None and files.lora.is_file() and len(said) == 2  # the adapter, then its base
    assert llamacpp.runtime_files(str(hf), "f16", progress=said.append).gguf == files.gguf  # shared export
    assert len(said) == 2
    reference = Engine(load(str(tmp_path / "adapter"), base=str(files.gguf), merge=True).model)
    base_only = Engine(load(str(files.gguf)).model)
    engine = llamacpp.LlamaCppEngine.for_files(files, max_seq_len=128)
    params = SamplingParams(max_new_tokens=24)
    for prompt in PROMPTS:
        expected = reference.generate([prompt], params)[0].tokens
        assert base_only.generate([prompt], params)[0].tokens != expected  # the adapter does change the text
        seq = prompt + expected
        ours = engine.tail_logits(seq[:-1], len(expected)).float().log_softmax(-1)  # (24, V)
        theirs = reference.model(torch.tensor([seq]))[0, len(prompt) - 1:-1].float().log_softmax(-1)
        kl = (theirs.exp() * (theirs - ours)).sum(-1)
        assert kl.mean() < 5e-3 and kl.max() < 0.05, kl
        # the same tokens up to the first near-tie (f16 rounding may break a tie either way)
        top2 = theirs.topk(2).values
        ties = ((top2[:, 0] - top2[:, 1]) < 0.1).nonzero()
        agree = int(ties[0]) if len(ties) else len(expected)
        assert engine.generate([prompt], params)[0].tokens[:agree] == expected[:agree]

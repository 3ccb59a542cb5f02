"""`slm export onnx`: a directory onnxruntime-genai runs, with slmkit's greedy tokens from the fp32 export,
a measured gap for int4, and refusals before any work (existing output, an architecture the builder
has no graph for, a missing extra)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.hf import save_hf
from slmkit.interop.onnx import INSTALL, onnx_missing
from slmkit.jobs.export import OnnxJob, run_onnx
from slmkit.load import random_model
from slmkit.presets import get_preset

PROMPT = [5, 17, 33, 2, 101, 7, 9, 40, 41]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with sharp logits (near-ties would flip with any kernel's rounding), as an HF directory."""
    model = random_model(get_preset("tiny").config, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    path = save_hf(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "hf")
    return model, path


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    if onnx_missing():
        pytest.skip(onnx_missing())
    _, path = tiny_dir
    root = tmp_path_factory.mktemp("onnx")
    return {p: run_onnx(OnnxJob(str(path), str(root / p), p), log=lambda *_: None) for p in ("fp32", "int4")}


def test_the_fp32_export_gives_slmkits_greedy_tokens_and_runs_from_slm_generate(tiny_dir, exports):
    from slmkit.infer.onnx_runtime import OnnxEngine
    from slmkit.jobs.generate import load_generator
    from slmkit.runtime import Runtime

    model, _ = tiny_dir
    params = SamplingParams(max_new_tokens=32)
    want = Engine(model).generate([PROMPT], params)[0].tokens
    got = OnnxEngine(exports["fp32"]).generate([PROMPT], params)[0]
    assert got.tokens == want and len(want) == 32
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "config.json"} <= {f.name for f in exports["fp32"].iterdir()}
    _, generator = load_generator(str(exports["fp32"]), Runtime())
    assert generator.complete(["Once upon a time"], SamplingParams(max_new_tokens=8))[0].text == \
        load_generator(str(tiny_dir[1]), Runtime(engine="torch", dtype="float32"))[1].complete(
            ["Once upon a time"], SamplingParams(max_new_tokens=8))[0].text
    with pytest.raises(SlmError, match="its own runtime only"):
        load_generator(str(exports["fp32"]), Runtime(engine="torch"))


def test_the_int4_export_is_smaller_and_close(tiny_dir, exports):
    """Teacher-forced next-token distributions of the int4 graph against slmkit's fp32 model: a KL per
    token that stays small (the README reports SmolLM2's)."""
    import onnxruntime_genai as og

    model, _ = tiny_dir
    size = {p: sum(f.stat().st_size for f in d.iterdir()) for p, d in exports.items()}
    assert size["int4"] < size["fp32"]
    sequence = PROMPT + Engine(model).generate([PROMPT], SamplingParams(max_new_tokens=16))[0].tokens
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([sequence]))[0].float(), -1)  # (T, V)
    onnx = og.Model(str(exports["int4"]))
    search = og.GeneratorParams(onnx)
    search.set_search_options(max_length=len(sequence) + 1)
    generator = og.Generator(onnx, search)
    kls = []
    for t, token in enumerate(sequence):
        generator.append_tokens([token])
        got = torch.log_softmax(torch.from_numpy(generator.get_logits()[0, -1].copy()), -1)
        kls.append(float((want[t].exp() * (want[t] - got)).sum()))
    assert 0 <= sum(kls) / len(kls) < 0.2, kls


def test_exports_are_refused_before_work(tiny_dir, tmp_path, monkeypatch, tiny_tokenizer):
    _, path = tiny_dir
    (tmp_path / "taken").mkdir()
    with pytest.raises(SlmError, match="exists; give --force"):
        run_onnx(OnnxJob(str(path), str(tmp_path / "taken")))
    with pytest.raises(SlmError, match="slm export onnx MODEL OUT"):
        run_onnx(OnnxJob(str(path), ""))
    widths = replace(get_preset("tiny").config, intermediate_size=[128, 96])  # per-layer widths (pruned)
    pruned = save_hf(random_model(widths, seed=0), tiny_tokenizer, tmp_path / "pruned")
    if onnx_missing() is None:
        with pytest.raises(SlmError, match="no Hugging Face class holds this model"):
            run_onnx(OnnxJob(str(pruned), str(tmp_path / "out")))
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    monkeypatch.setattr("slmkit.interop.onnx.onnx_missing", lambda: f"ONNX export needs onnxruntime-genai: {INSTALL}")
    with pytest.raises(SlmError, match=r"pip install -e '\.\[onnx\]'"):
        run_onnx(OnnxJob(str(path), str(tmp_path / "out2")))


def test_slm_bench_measures_an_exported_directory_at_batch_one(exports):
    from slmkit.evals.device import BenchSettings, measure_here

    result = measure_here(str(exports["int4"]), BenchSettings(prompt_tokens=8, new_tokens=6, runs=1))
    assert result.engine == "onnx" and result.dtype == "onnx-int4" and result.file_mib > 0
    assert result.batches["1"]["decode_tok_s"]["median"] > 0
    with pytest.raises(SlmError, match="batch 1 only"):
        measure_here(str(exports["int4"]), BenchSettings(prompt_tokens=8, new_tokens=6, batches=(1, 2)))

"""`slm export executorch`: a .pte program ExecuTorch's runtime runs, with slmkit's logits from the fp32
export (teacher-forced, through the static cache, a prompt read in one call or in pieces), a measured
gap for 8da4w and int8, ExecuTorch's own LLM runner reading the program and its tokenizer, `slm
generate` on the file, and refusals before any work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.executorch import INSTALL, executorch_missing
from slmkit.interop.hf import save_hf
from slmkit.interop.phone import sidecar_dir
from slmkit.jobs.export import ExecutorchJob, run_executorch
from slmkit.load import random_model
from slmkit.presets import get_preset

PROMPT = [5, 17, 33, 2, 101, 7, 9, 40, 41]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with sharp logits, as an HF directory (sliding-window layers included, so
    both attention paths of the export run: ExecuTorch's custom SDPA and the masked plain one)."""
    config = replace(get_preset("tiny").config, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    model = random_model(config, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    path = save_hf(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "hf")
    return model, path


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    if executorch_missing():
        pytest.skip(executorch_missing())
    _, path = tiny_dir
    root = tmp_path_factory.mktemp("pte")
    return {p: run_executorch(ExecutorchJob(str(path), str(root / f"tiny-{p}.pte"), p, max_seq_len=96), **QUIET)
            for p in ("fp32", "8da4w", "int8")}


def teacher_forced(engine, sequence: list[int], split: int) -> torch.Tensor:
    """Log-probabilities (T - split + 1, V) after sequence[:split] read in one call, then token by token."""
    rows = [engine.forward(sequence[:split], 0)[0]]
    rows += [engine.forward([tok], i)[0] for i, tok in enumerate(sequence[split:], start=split)]
    return torch.log_softmax(torch.stack(rows), -1)


def reference(model, sequence: list[int], split: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([sequence]))[0, split - 1:].float(), -1)


def test_the_fp32_program_gives_slmkits_logits_and_greedy_tokens(tiny_dir, exports):
    from slmkit.infer.executorch_runtime import ExecuTorchEngine

    model, _ = tiny_dir
    engine = ExecuTorchEngine(exports["fp32"])
    sequence = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert (teacher_forced(engine, sequence, 12) - reference(model, sequence, 12)).abs().max() < 1e-4
    # a later prompt overwrites the cache from slot 0, and a prompt may continue one read before
    engine.forward(sequence[:5], 0)
    middle = torch.log_softmax(engine.forward(sequence[5:20], 5)[0], -1)
    assert (middle - reference(model, sequence[:20], 20)[0]).abs().max() < 1e-4
    params = SamplingParams(max_new_tokens=32)
    want = Engine(model).generate([PROMPT], params)[0].tokens
    assert engine.generate([PROMPT], params)[0].tokens == want and len(want) == 32


def test_quantized_programs_are_smaller_and_close(tiny_dir, exports):
    """KL per token of the quantized programs against slmkit's fp32 model, teacher-forced (the README
    reports SmolLM2's); both stay far below the gap a broken kernel gives (tens of nats)."""
    from slmkit.infer.executorch_runtime import ExecuTorchEngine

    model, _ = tiny_dir
    size = {p: f.stat().st_size for p, f in exports.items()}
    assert size["8da4w"] < size["int8"] < size["fp32"]
    sequence = PROMPT + Engine(model).generate([PROMPT], SamplingParams(max_new_tokens=24))[0].tokens
    want = reference(model, sequence, len(PROMPT))
    for precision, bound in (("8da4w", 0.05), ("int8", 0.005)):
        got = teacher_forced(ExecuTorchEngine(exports[precision]), sequence, len(PROMPT))
        kl = (want.exp() * (want - got)).sum(-1).mean().item()
        assert 0 <= kl < bound, (precision, kl)


def test_executorchs_own_llm_runner_reads_the_program_and_tokenizer(tiny_dir, exports, tiny_tokenizer):
    """ExecuTorch's TextLLMRunner (the C++ runner apps embed) loads OUT.pte with OUT_tokenizer/ and
    decodes greedily what slmkit decodes."""
    runner_module = pytest.importorskip("executorch.extension.llm.runner")
    from slmkit.infer.executorch_runtime import runtime_log

    model, _ = tiny_dir
    pte = exports["fp32"]
    side = sidecar_dir(pte)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {f.name for f in side.iterdir()}
    prompt = "Once upon a time"
    ids = tiny_tokenizer.encode(prompt)
    want = tiny_tokenizer.decode(Engine(model).generate([ids], SamplingParams(max_new_tokens=12))[0].tokens)
    pieces = []
    with runtime_log():
        runner = runner_module.TextLLMRunner(str(pte), str(side / "tokenizer.json"))
        config = runner_module.GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0)
        runner.generate(prompt, config, token_callback=pieces.append)
    assert "".join(pieces).startswith(want[:8])


def test_slm_generate_and_bench_run_the_file(tiny_dir, exports):
    from slmkit.evals.device import BenchSettings, measure
    from slmkit.jobs.generate import load_generator
    from slmkit.runtime import Runtime

    _, hf = tiny_dir
    pte = str(exports["fp32"])
    params = SamplingParams(max_new_tokens=8)
    _, generator = load_generator(pte, Runtime())
    want = load_generator(str(hf), Runtime(engine="torch", dtype="float32"))[1].complete(["Once upon a time"], params)
    assert generator.complete(["Once upon a time"], params)[0].text == want[0].text
    with pytest.raises(SlmError, match="its own runtime only"):
        load_generator(pte, Runtime(engine="torch"))
    result = measure(pte, BenchSettings(prompt_tokens=16, new_tokens=8, runs=1))
    assert result.engine == "executorch" and result.batches["1"]["decode_tok_s"]["median"] > 0
    assert result.file_mib > 0 and result.dtype == "executorch-fp32"


def test_bad_input_is_refused_before_work(tiny_dir, exports, tmp_path, monkeypatch):
    model, hf = tiny_dir
    with pytest.raises(SlmError, match="exists; give --force"):
        run_executorch(ExecutorchJob(str(hf), str(exports["fp32"]), "fp32"), **QUIET)
    with pytest.raises(SlmError, match="name the output OUT.pte"):
        run_executorch(ExecutorchJob(str(hf), str(tmp_path / "model.bin")), **QUIET)
    moe = replace(get_preset("tiny").config, num_local_experts=4, num_experts_per_tok=2)
    moe_dir = save_hf(random_model(moe, seed=0), None, tmp_path / "moe")
    with pytest.raises(SlmError, match="mixture-of-experts"):
        run_executorch(ExecutorchJob(str(moe_dir), str(tmp_path / "moe.pte")), **QUIET)
    with pytest.raises(SlmError, match="--max-seq-len must be between"):
        run_executorch(ExecutorchJob(str(hf), str(tmp_path / "long.pte"), max_seq_len=10**9), **QUIET)
    assert not list(tmp_path.glob("*.pte")) and not list(tmp_path.glob("*_tokenizer"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(SlmError, match=INSTALL.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        run_executorch(ExecutorchJob(str(hf), str(tmp_path / "x.pte")), **QUIET)


def test_the_pipeline_export_stage_writes_and_times_the_phone_exports(exports, tmp_path, tiny_tokenizer):
    """`export: {executorch: {...}}` in a recipe: the stage writes the program beside the GGUF and a
    report row times it on ExecuTorch (slm bench on the file)."""
    from slmkit.evals.device import BenchSettings
    from slmkit.pipeline import deploy
    from slmkit.pipeline.config import EvaluateStage, ExportStage

    hf = save_hf(random_model(get_preset("tiny").config, seed=0), tiny_tokenizer, tmp_path / "hf")
    cfg = ExportStage(hf=False, check=False, executorch=ExecutorchJob(precision="fp32", max_seq_len=64))
    outputs = deploy.export_files(str(hf), None, cfg, "tiny", tmp_path, lambda *_: None)
    assert outputs["executorch"] == str(tmp_path / "tiny-executorch-fp32.pte") and sidecar_dir(outputs["executorch"]).is_dir()
    rows = deploy.phone_rows(outputs, cfg, EvaluateStage(bench=BenchSettings(prompt_tokens=8, new_tokens=4, runs=1)),
                             "export")
    assert [r["stage"] for r in rows] == ["export (ExecuTorch fp32)"]
    assert rows[0]["engine"] == "executorch" and rows[0]["decode_tps"] > 0

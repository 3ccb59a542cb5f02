"""`slm export litert`: a .tflite file LiteRT's interpreter runs, with slmkit's logits from the fp32 file
(teacher-forced: a prompt read in padded prefill chunks, then token by token past a sliding window),
a measured gap for int8 and int4, `slm generate` on the file, and refusals before any work.

LiteRT's converter cannot share an environment with the [test] extra (litert-converter 0.5.0 pins
xdsl==0.28.0, which pins typing-extensions<4.13; openai and selenium need >=4.14), so these tests
carry the `litert` marker: `make test` deselects them and `make litert-check` (run by .ci/run) runs
them in .venv-litert, an environment of slmkit's core and the [litert] extra."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.hf import save_hf
from slmkit.interop.litert import litert_missing
from slmkit.interop.phone import sidecar_dir
from slmkit.jobs.export import LitertJob, run_litert
from slmkit.load import random_model
from slmkit.presets import get_preset

pytestmark = pytest.mark.litert
PROMPT = [5, 17, 33, 2, 101, 7, 9, 40, 41]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    config = replace(get_preset("tiny").config, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    model = random_model(config, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    return model, save_hf(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    if litert_missing():
        pytest.fail(litert_missing())  # only collected by `make litert-check`, which installs the extra
    _, path = tiny_dir
    root = tmp_path_factory.mktemp("tflite")
    return {p: run_litert(LitertJob(str(path), str(root / f"tiny-{p}.tflite"), p, max_seq_len=96), **QUIET)
            for p in ("fp32", "int8", "int4")}


def reference(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([sequence]))[0].float(), -1)


def teacher_forced(path, sequence: list[int], split: int) -> torch.Tensor:
    from slmkit.infer.litert_runtime import LiteRTEngine

    engine = LiteRTEngine(path, threads=1)
    rows = [engine.forward(sequence[:split], 0)] + [engine.forward([t], i) for i, t in enumerate(sequence[split:], split)]
    return torch.log_softmax(torch.cat(rows), -1)


def test_the_fp32_file_gives_slmkits_logits_and_greedy_tokens(tiny_dir, files):
    from slmkit.infer.litert_runtime import LiteRTEngine

    model, _ = tiny_dir
    sequence = torch.randint(0, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    got = teacher_forced(files["fp32"], sequence, 40)  # 40 prompt tokens: two prefill chunks, the second padded
    assert (got - reference(model, sequence)).abs().max() < 1e-4
    params = SamplingParams(max_new_tokens=32)
    want = Engine(model).generate([PROMPT], params)[0].tokens
    assert LiteRTEngine(files["fp32"]).generate([PROMPT], params)[0].tokens == want and len(want) == 32


def test_quantized_files_are_smaller_and_close(tiny_dir, files):
    model, _ = tiny_dir
    size = {p: f.stat().st_size for p, f in files.items()}
    assert size["int4"] < size["int8"] < size["fp32"]
    sequence = PROMPT + Engine(model).generate([PROMPT], SamplingParams(max_new_tokens=24))[0].tokens
    want = reference(model, sequence)
    for precision, bound in (("int8", 0.005), ("int4", 0.05)):
        got = teacher_forced(files[precision], sequence, len(PROMPT))
        kl = (want.exp() * (want - got)).sum(-1).mean().item()
        assert 0 <= kl < bound, (precision, kl)


def test_slm_generate_and_bench_run_the_file(tiny_dir, files):
    from slmkit.evals.device import BenchSettings, measure
    from slmkit.jobs.generate import load_generator
    from slmkit.runtime import Runtime

    _, hf = tiny_dir
    path = str(files["fp32"])
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {f.name for f in sidecar_dir(path).iterdir()}
    params = SamplingParams(max_new_tokens=8)
    want = load_generator(str(hf), Runtime(engine="torch", dtype="float32"))[1].complete(["Once upon a time"], params)
    assert load_generator(path, Runtime())[1].complete(["Once upon a time"], params)[0].text == want[0].text
    result = measure(path, BenchSettings(prompt_tokens=16, new_tokens=8, runs=1))
    assert result.engine == "litert" and result.dtype == "litert-fp32" and result.batches["1"]["decode_tok_s"]["median"] > 0


def test_bad_input_is_refused_before_work(tiny_dir, files, tmp_path):
    _, hf = tiny_dir
    with pytest.raises(SlmError, match="exists; give --force"):
        run_litert(LitertJob(str(hf), str(files["fp32"]), "fp32"), **QUIET)
    with pytest.raises(SlmError, match="name the output OUT.tflite"):
        run_litert(LitertJob(str(hf), str(tmp_path / "model.pte")), **QUIET)
    moe = replace(get_preset("tiny").config, num_local_experts=4, num_experts_per_tok=2)
    moe_dir = save_hf(random_model(moe, seed=0), None, tmp_path / "moe")
    with pytest.raises(SlmError, match="mixture-of-experts"):
        run_litert(LitertJob(str(moe_dir), str(tmp_path / "moe.tflite")), **QUIET)
    assert not list(tmp_path.glob("*.tflite")) and not list(tmp_path.glob("*_tokenizer"))

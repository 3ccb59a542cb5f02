"""torch.compile of the decode step gives the same tokens as eager decoding (slow: ~1-2 min compile)."""

from __future__ import annotations

import pytest
import torch

from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams

pytestmark = pytest.mark.slow


def test_compiled_decode_matches_eager(tiny_model):
    prompt = [1, 5, 9, 13, 17]
    params = SamplingParams(max_new_tokens=16)
    eager = Engine(tiny_model).generate([prompt], params)[0].tokens
    compiled = Engine(tiny_model, compile=True).generate([prompt], params)[0].tokens
    assert compiled == eager


def test_compiled_bf16_smollm2_matches_eager():
    from slmkit.load import load

    loaded = load("smollm2-135m-instruct", dtype=torch.bfloat16)
    prompt = loaded.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_new_tokens=12)
    eager = Engine(loaded.model).generate([prompt], params)[0].tokens
    compiled = Engine(loaded.model, compile=True).generate([prompt], params)[0].tokens
    assert compiled == eager


def test_compiled_int4_decode_matches_eager(tiny_model):
    """The fused sibling kernels are undone for compiling (their identity cache is eager-only state),
    and padded int4 inputs take the plain pad inside the graph; the tokens stay the same."""
    import copy

    from slmkit.compress.quant.qlinear import Int4Linear
    from slmkit.compress.quant.quantize import QuantConfig, quantize_model

    model = copy.deepcopy(tiny_model)
    quantize_model(model, QuantConfig(method="int4", group_size=32), progress=False)
    prompt, params = [1, 5, 9, 13, 17], SamplingParams(max_new_tokens=16)
    eager = Engine(model).generate([prompt], params)[0].tokens
    engine = Engine(model, compile=True)
    assert not any(m.shared_kernel for m in model.modules() if isinstance(m, Int4Linear))
    assert engine.generate([prompt], params)[0].tokens == eager

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

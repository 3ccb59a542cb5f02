"""ONNX Runtime GenAI as a runtime: an `slm export onnx` directory, run by onnxruntime-genai, with
slmkit's sampler choosing every token (`decode_rows`, the decode loop of every engine), so sampling
settings, stop tokens and structured output behave as on the torch and llama.cpp engines.

The runtime computes the logits (its Generator keeps the KV cache); its own search is not used.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from slmkit.errors import SlmError
from slmkit.fileio import dir_bytes, read_json
from slmkit.infer.constrain import TokenMatcher
from slmkit.infer.engine import Generation, TokenCallback, check_prompt, decode_rows
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.hf import read_hf_config
from slmkit.interop.onnx import onnx_missing

try:
    import onnxruntime_genai as og
except ImportError:  # the [onnx] extra
    og = None


def is_onnx_dir(spec: str | Path) -> bool:
    """Whether MODEL is an ONNX Runtime GenAI directory."""
    return Path(spec).is_dir() and (Path(spec) / "genai_config.json").is_file()


class OnnxEngine:
    """Engine's `generate` over an ONNX Runtime GenAI directory, one prompt at a time (batch 1: what
    the phones and edge boxes it targets run)."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None):
        if og is None:
            raise SlmError(onnx_missing() or "onnxruntime-genai does not import")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise SlmError(f"'{path}' has no config.json: export it with `slm export onnx` (which writes the "
                           "architecture beside the graph)")
        self.config = read_hf_config(path)
        genai = (read_json(path / "genai_config.json") or {}).get("model", {})
        context = int(genai.get("context_length") or self.config.max_position_embeddings)
        self.max_seq_len = min(max_seq_len or context, context)
        self.vocab_size = int(genai.get("vocab_size") or self.config.vocab_size)
        self.precision = (read_json(path / "slmkit_onnx.json") or {}).get("precision", "graph")
        self.path, self.model = path, og.Model(str(path))

    def reset(self) -> None:
        """Nothing to forget: every prompt gets a fresh Generator (and KV cache)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token: TokenCallback | None = None,
                 matchers: list[TokenMatcher] | None = None) -> list[Generation]:
        for prompt in prompts:
            check_prompt(prompt, self.max_seq_len, self.vocab_size)
        params.check_vocab(self.vocab_size)
        out = []
        for row, prompt in enumerate(prompts):
            shifted = None if on_token is None else (lambda _r, tok, row=row: on_token(row, tok))
            out += self._generate(prompt, params, shifted, matchers and [matchers[row]])
        return out

    def _generate(self, prompt: list[int], params: SamplingParams, on_token, matchers) -> list[Generation]:
        start = time.perf_counter()
        budget = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        search = og.GeneratorParams(self.model)
        search.set_search_options(max_length=len(prompt) + budget)
        generator = og.Generator(self.model, search)
        generator.append_tokens(prompt)
        logits = self._logits(generator)
        prefill_s = time.perf_counter() - start

        def step(feed: list[tuple[int, int, int]]) -> torch.Tensor:  # one row: (row, token, position)
            generator.append_tokens([feed[0][1]])
            return self._logits(generator)

        results = decode_rows([prompt], logits, params, budget, on_token, step, matchers)
        for g in results:
            g.prefill_seconds, g.decode_seconds = prefill_s, time.perf_counter() - start - prefill_s
        return results

    @staticmethod
    def _logits(generator) -> torch.Tensor:
        return torch.from_numpy(generator.get_logits()[:, -1].copy())  # (1, V), the last position's

    def file_bytes(self) -> int:
        return dir_bytes(self.path)

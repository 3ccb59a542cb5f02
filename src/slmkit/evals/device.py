"""On-device latency and memory: what a model costs to run here, before or after training it.

Each model is measured in its own fresh Python process (so peak resident memory and load time are
its own, not the sum of everything measured before): load, one warm-up generation (excluded),
then `runs` timed generations per batch size of a fixed random prompt, never stopping early.
Reported per batch size: time to first token (the prefill), prefill tokens/s, decode tokens/s
(all rows together), each as the median with min and max over the runs; plus load seconds, peak
resident memory (VmHWM) and the weights' file size. Presets run with random weights, so a user
can see how depth, width, GQA and vocabulary change latency on their machine before training.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from slmkit.compress.quant.qlinear import weight_count
from slmkit.config import from_dict
from slmkit.errors import SlmError
from slmkit.infer.engine import Engine
from slmkit.infer.executorch_runtime import ExecuTorchEngine, is_pte
from slmkit.infer.litert_runtime import LiteRTEngine, is_tflite
from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, gguf_kind, runtime_files
from slmkit.infer.onnx_runtime import OnnxEngine, is_onnx_dir
from slmkit.infer.sampling import SamplingParams
from slmkit.load import load, resolve
from slmkit.plots import save_png, scatter
from slmkit.runtime import Runtime, use_threads
from slmkit.sizing import count_params

# Real shapes only (the tiny test configs would squash the plot), from 135M to 1.5B, several families at similar sizes, so the sweep shows what the architecture
# (vocabulary, head count, GQA, Gemma's 256-wide heads, OLMo-2's post-norms) does to speed at equal parameters.
SWEEP_PRESETS = ("smollm2-135m", "gemma-3-270m", "openelm-270m", "smollm2-360m", "qwen2.5-0.5b", "qwen3-0.6b",
                 "gemma-3-1b", "llama-3.2-1b", "olmo-2-1b")


@dataclass
class BenchSettings:
    prompt_tokens: int = 512
    """prompt length in tokens"""
    new_tokens: int = 128
    """tokens generated per run (never stops early)"""
    batches: tuple[int, ...] = field(default=(1,), metadata={"flag": "--batch"})
    """batch sizes, each measured in turn (e.g. 1,8)"""
    runs: int = 3
    """timed runs per batch size after one warm-up"""
    seed: int = 0
    """seed of the random prompt tokens"""
    runtime: Runtime = field(default_factory=lambda: Runtime(engine="torch", dtype="float32"))
    """the runtime measured (presets, which have random weights, always run on torch)"""

    def check(self, context: int | None = None, name: str = "bench") -> None:
        """Refuse bad settings in one line, before any work; with `context` (the model's, in
        tokens), also a prompt and generation that would not fit."""
        if not self.batches or min(self.batches) < 1 or self.runs < 1 or self.prompt_tokens < 1 or self.new_tokens < 2:
            raise SlmError(f"{name}: batch sizes and runs must be >= 1, prompt_tokens >= 1 and new_tokens >= 2")
        if context is not None and self.prompt_tokens + self.new_tokens > context:
            raise SlmError(f"{name}: {self.prompt_tokens} + {self.new_tokens} tokens exceed the model's "
                           f"{context}-token context")


@dataclass
class ModelBench:
    model: str
    params: int
    file_mib: float
    load_s: float
    peak_mib: float
    dtype: str
    threads: int
    batches: dict[str, dict] = field(default_factory=dict)  # "1" -> {metric: {median, min, max}}
    engine: str = "torch"


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_here(spec: str, settings: BenchSettings) -> ModelBench:
    """Measure in this process (the worker side of `measure`)."""
    use_threads(settings.runtime.threads)
    started = time.perf_counter()
    if is_onnx_dir(spec):  # an `slm export onnx` directory runs on onnxruntime-genai, whatever --engine says
        engine, result = _onnx_engine(spec, settings)
    elif is_pte(spec) or is_tflite(spec):  # a phone export runs on its own runtime, whatever --engine says
        engine, result = _phone_engine(spec, settings)
    elif choose_engine(settings.runtime.engine, spec) == "llamacpp":
        engine, result = _llamacpp_engine(spec, settings)
    else:
        engine, result = _torch_engine(spec, settings)
    result.load_s = time.perf_counter() - started
    context = engine.config.max_position_embeddings if result.engine == "torch" else engine.max_seq_len
    settings.check(context, spec)
    generator = torch.Generator().manual_seed(settings.seed)
    params = SamplingParams(max_new_tokens=settings.new_tokens)  # no stop tokens: always the full count
    vocab = engine.config.vocab_size
    for batch in settings.batches:
        prompts = torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=generator).tolist()
        engine.reset()
        engine.generate(prompts, SamplingParams(max_new_tokens=4))  # warm-up: allocations, kernel selection
        ttft, prefill, decode = [], [], []
        for _ in range(settings.runs):
            engine.reset()
            g = engine.generate(prompts, params)[0]
            ttft.append(g.prefill_seconds)
            prefill.append(batch * settings.prompt_tokens / g.prefill_seconds)
            decode.append(batch * g.decode_tokens_per_second)
        result.batches[str(batch)] = {"ttft_s": _spread(ttft), "prefill_tok_s": _spread(prefill),
                                      "decode_tok_s": _spread(decode)}
    result.peak_mib = peak_rss_mib()
    return result


def _torch_engine(spec: str, settings: BenchSettings):
    loaded = load(spec, dtype=getattr(torch, settings.runtime.dtype), allow_random=True, merge=True)
    model = loaded.model
    return Engine(model), ModelBench(spec, weight_count(model),
                                     loaded.source.file_bytes / 2**20, 0.0, 0.0, settings.runtime.dtype,
                                     torch.get_num_threads(), engine="torch")


def _llamacpp_engine(spec: str, settings: BenchSettings):
    """llama.cpp on the model's GGUF (exported once to `gguf_type` unless it is one), with room for
    every row of the largest batch."""
    r = settings.runtime
    files = runtime_files(spec, r.gguf_type, progress=lambda m: print(m, file=sys.stderr))
    # the context asked for (--context: e.g. the cache an exported phone file holds, for the same memory),
    # else just room for the prompt and the new tokens
    context = max(r.context or 0, settings.prompt_tokens + settings.new_tokens)
    engine = LlamaCppEngine.for_files(files, context, r.threads, sequences=max(settings.batches))
    return engine, ModelBench(spec, engine.parameters, files.file_bytes / 2**20, 0.0, 0.0,
                              gguf_kind(files.gguf, r.gguf_type), r.threads or torch.get_num_threads(), engine="llamacpp")


def _onnx_engine(spec: str, settings: BenchSettings):
    """onnxruntime-genai on an exported directory: batch 1 only (its Generator runs one sequence here)."""
    if settings.batches != (1,):
        raise SlmError(f"'{spec}' is an ONNX Runtime GenAI directory, measured at batch 1 only; drop --batch")
    engine = OnnxEngine(spec, settings.prompt_tokens + settings.new_tokens, settings.runtime.threads)
    return engine, ModelBench(spec, count_params(engine.config).total, engine.file_bytes() / 2**20, 0.0, 0.0,
                              f"onnx-{engine.precision}", engine.threads, engine="onnx")


def _phone_engine(spec: str, settings: BenchSettings):
    """ExecuTorch (.pte) or LiteRT (.tflite) on an exported file: batch 1 only (its cache holds one sequence)."""
    runtime = "executorch" if is_pte(spec) else "litert"
    if settings.batches != (1,):
        raise SlmError(f"'{spec}' is a {runtime} file, measured at batch 1 only; drop --batch")
    kind = ExecuTorchEngine if runtime == "executorch" else LiteRTEngine
    engine = kind(spec, settings.prompt_tokens + settings.new_tokens, settings.runtime.threads)
    return engine, ModelBench(spec, count_params(engine.config).total, engine.file_bytes() / 2**20, 0.0, 0.0,
                              f"{runtime}-{engine.precision}", engine.threads, engine=runtime)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; getrusage's ru_maxrss would report a forking
    parent's maximum for a child started by fork+exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def measure(spec: str, settings: BenchSettings) -> ModelBench:
    """Measure `spec` in a fresh process and return its numbers."""
    resolve(spec)  # a bad name or path fails here, with the close names, before a process starts
    command = [sys.executable, "-m", "slmkit.evals.device", spec, json.dumps(asdict(settings))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise SlmError(f"benchmarking {spec} failed: {tail}")
    return ModelBench(**json.loads(done.stdout.strip().splitlines()[-1]))


def bench_table(results: list[ModelBench], settings: BenchSettings):
    table = Table(title=f"{settings.prompt_tokens}-token prompt, {settings.new_tokens} new tokens, "
                        f"median of {settings.runs} (min-max)")
    for column in ("model", "runtime", "params", "batch", "TTFT s", "prefill tok/s", "decode tok/s", "load s", "peak MiB",
                   "file MiB"):
        table.add_column(column, justify="left" if column == "model" else "right")

    def cell(d: dict, digits: int) -> str:
        return f"{d['median']:.{digits}f} ({d['min']:.{digits}f}-{d['max']:.{digits}f})"

    for r in results:
        for i, (batch, m) in enumerate(r.batches.items()):
            table.add_row(r.model if i == 0 else "", f"{r.engine} {r.dtype}" if i == 0 else "",
                          f"{r.params / 1e6:.1f}M" if i == 0 else "", batch,
                          cell(m["ttft_s"], 3), cell(m["prefill_tok_s"], 0), cell(m["decode_tok_s"], 1),
                          f"{r.load_s:.2f}" if i == 0 else "", f"{r.peak_mib:.0f}" if i == 0 else "",
                          f"{r.file_mib:.1f}" if i == 0 and r.file_mib else "")
    return table


def sweep_plot(results: list[ModelBench], path: Path) -> Path:
    """Decode tokens/s (batch 1 or the first batch measured) against parameters, one point per model."""
    points = [(r.params / 1e6, next(iter(r.batches.values()))["decode_tok_s"]["median"], r.model) for r in results]
    return save_png(scatter(points, "parameters (millions, log scale)", "decode tokens/s", log_x=True,
                            title="Latency is not only parameter count: depth, width, GQA, vocabulary"), path)


if __name__ == "__main__":  # worker: python -m slmkit.evals.device SPEC SETTINGS_JSON
    print(json.dumps(asdict(measure_here(sys.argv[1], from_dict(BenchSettings, json.loads(sys.argv[2]))))))

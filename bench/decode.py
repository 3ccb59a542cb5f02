"""Prefill and decode speed of SmolLM2-135M: slmkit's engines against transformers and raw llama.cpp, in one run.

Both sides get the same weights (the bundled GGUF, dequantized to fp32), the same prompt and the
same thread count. Each measurement times generation of 1 token (= prefill) and of N tokens;
decode tokens/s = batch * (N - 1) / (t_N - t_1). Configurations are interleaved over several
rounds and the median is reported, because this machine is noisy. The result that matters is the
ratio to transformers fp32 measured in the same run, and for slmkit's llama.cpp engine the ratio
to raw llama-cpp-python (`Llama.generate`, greedy) on the same GGUF file (Q8_0 and Q4_0 exports of
the same weights; batch 1, the only batch `Llama` decodes).

    python bench/decode.py [--rounds 3] [--prompt-tokens 128] [--new-tokens 64] [--no-compile] [--no-llamacpp]
                           [--start-times]

With compilation on, bf16 and int4 (RTN, group 32) are also timed through `torch.compile` with the
engine's settings (`slmkit.infer.engine.COMPILE_OPTIONS`); --start-times also measures how long a
fresh process takes from the compile call to its first tokens on int4, with an empty inductor cache
and again with the cache the first start left (what a second `slm generate --compile` pays).

Writes bench/results/decode.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from slmkit.compress.quant.quantize import QuantConfig, quantize_model  # noqa: E402
from slmkit.infer.engine import Engine  # noqa: E402
from slmkit.infer.llamacpp import LlamaCppEngine, available  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.interop.gguf import write_gguf  # noqa: E402
from slmkit.load import bundled_gguf, load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = (Path(os.environ.get("SLMKIT_DATA_DIR", ROOT.parent / "shared" / "data"))
        / "corpus" / "tinystories" / "tinystories_train_sample.txt")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = DATA.read_text() if DATA.is_file() else "Once upon a time, there was a little robot. " * 200
    ids = tokenizer.encode(text)[:n]
    assert len(ids) == n
    return ids


def slmkit_runner(model, dtype, compile: bool = False):
    engine = Engine(model.to(dtype), compile=compile)

    def run(batch: list[list[int]], new: int) -> float:
        engine.reset()  # no prefix reuse between runs: transformers has none either
        start = time.perf_counter()
        out = engine.generate(batch, SamplingParams(max_new_tokens=new))  # no stop tokens: always `new`
        assert all(len(g.tokens) == new for g in out)
        return time.perf_counter() - start

    return run


def int4_model():
    model = load("smollm2-135m-instruct", dtype=torch.float32).model
    quantize_model(model, QuantConfig(method="int4", group_size=32), progress=False)
    return model


START_CODE = """
import sys, time
sys.path.insert(0, {bench!r})
from decode import int4_model
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
model = int4_model()
start = time.perf_counter()
Engine(model, compile=True).generate([list(range(100, 116))], SamplingParams(max_new_tokens=4))
print(time.perf_counter() - start)
"""


def compile_start_seconds() -> dict:
    """Seconds from `Engine(compile=True)` to the first tokens in a fresh process: with an empty
    inductor cache, then with the cache that first start wrote."""
    code = START_CODE.format(bench=str(Path(__file__).resolve().parent))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for which in ("first", "second"):
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[which] = float(done.stdout.strip().splitlines()[-1])
    return out


def transformers_runner():
    import transformers
    from transformers.utils.quantization_config import GgufConfig

    transformers.logging.set_verbosity_error()
    path = bundled_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()

    def run(batch: list[list[int]], new: int) -> float:
        ids = torch.tensor(batch)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - start

    return run


def llamacpp_raw_runner(path: Path):
    """llama-cpp-python as its users call it: `Llama.generate`, greedy (batch 1 only)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)

    def run(batch: list[list[int]], new: int) -> float:
        assert len(batch) == 1
        llm.reset()  # else `generate` reuses the cached prompt prefix and the prefill is not timed
        start, count = time.perf_counter(), 0
        for _ in llm.generate(batch[0], temp=0.0, top_k=1, reset=True):
            count += 1
            if count == new:
                break
        return time.perf_counter() - start

    return run


def slmkit_llamacpp_runner(path: Path, config, sequences: int):
    engine = LlamaCppEngine(path, config, 1024, sequences=sequences)

    def run(batch: list[list[int]], new: int) -> float:
        engine.reset()  # no prefix reuse between runs: the raw runner resets too
        start = time.perf_counter()
        out = engine.generate(batch, SamplingParams(max_new_tokens=new))
        assert all(len(g.tokens) == new for g in out)
        return time.perf_counter() - start

    return run


def measure(run, prompt: list[int], batch: int, new: int) -> dict:
    prompts = [prompt] * batch
    t1 = run(prompts, 1)
    tn = run(prompts, new)
    return {"prefill_tps": batch * len(prompt) / t1, "decode_tps": batch * (new - 1) / (tn - t1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (saves ~2 min)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows")
    parser.add_argument("--start-times", action="store_true",
                        help="also time compiled int4's first and second start in fresh processes (~8 min)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    loaded = load("smollm2-135m-instruct", dtype=torch.float32)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    int4 = int4_model()
    runners = {
        "transformers fp32": transformers_runner(),
        "slmkit fp32": slmkit_runner(load("smollm2-135m-instruct", dtype=torch.float32).model, torch.float32),
        "slmkit bf16": slmkit_runner(loaded.model, torch.bfloat16),
        "slmkit int4": slmkit_runner(int4, torch.float32),
    }
    if not args.no_compile:
        compiled = load("smollm2-135m-instruct", dtype=torch.bfloat16).model
        runners["slmkit bf16 compiled"] = slmkit_runner(compiled, torch.bfloat16, compile=True)
        runners["slmkit int4 compiled"] = slmkit_runner(int4_model(), torch.float32, compile=True)
    batch_one = set()  # runners that decode one sequence only
    if not args.no_llamacpp and available():
        out = ROOT / "runs" / "bench-decode"
        out.mkdir(parents=True, exist_ok=True)
        weights = load("smollm2-135m-instruct", dtype=torch.float32).model  # fp32 (the bf16 runner converted `loaded`)
        for kind in ("q8_0", "q4_0"):
            path = write_gguf(weights, loaded.tokenizer, out / f"smollm2-{kind}.gguf", kind)
            runners[f"llama.cpp raw {kind}"] = llamacpp_raw_runner(path)
            runners[f"slmkit llamacpp {kind}"] = slmkit_llamacpp_runner(path, loaded.model.config, max(batches))
            batch_one.add(f"llama.cpp raw {kind}")
    for name, run in runners.items():  # warm-up (and compilation), excluded
        for batch in batches:
            if batch == 1 or name not in batch_one:
                run([prompt[:16]] * batch, 4)

    samples: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for batch in batches:
            for name, run in runners.items():
                if batch == 1 or name not in batch_one:
                    samples.setdefault((name, batch), []).append(measure(run, prompt, batch, args.new_tokens))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for (name, batch), runs in samples.items():
        rows.append({"engine": name, "batch": batch,
                     "prefill_tps": statistics.median(x["prefill_tps"] for x in runs),
                     "decode_tps": statistics.median(x["decode_tps"] for x in runs),
                     "decode_tps_runs": [round(x["decode_tps"], 2) for x in runs]})
    for row in rows:
        ref = next(r for r in rows if r["engine"] == "transformers fp32" and r["batch"] == row["batch"])
        row["decode_vs_transformers_fp32"] = row["decode_tps"] / ref["decode_tps"]
        row["prefill_vs_transformers_fp32"] = row["prefill_tps"] / ref["prefill_tps"]
        raw = next((r for r in rows if row["engine"].startswith("slmkit llamacpp") and r["batch"] == row["batch"]
                    and r["engine"] == row["engine"].replace("slmkit llamacpp", "llama.cpp raw")), None)
        row["decode_vs_raw_llamacpp"] = row["decode_tps"] / raw["decode_tps"] if raw else None
    starts = compile_start_seconds() if args.start_times else None
    result = {
        "benchmark": "decode", "compiled_int4_start_s": starts, "model": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized)",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    if starts:
        print(f"compiled int4, compile call to first tokens: first start {starts['first']:.0f} s, "
              f"second start {starts['second']:.0f} s")
    print(f"wrote {args.out}")


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':24s} {'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode x HF':>12s} "
          f"{'x raw llama.cpp':>16s}")
    for r in sorted(rows, key=lambda r: (r["batch"], r["engine"])):
        raw = f"{r['decode_vs_raw_llamacpp']:15.2f}x" if r.get("decode_vs_raw_llamacpp") else f"{'':16s}"
        print(f"{r['engine']:24s} {r['batch']:5d} {r['prefill_tps']:14.1f} {r['decode_tps']:13.1f} "
              f"{r['decode_vs_transformers_fp32']:11.2f}x {raw}")


if __name__ == "__main__":
    main()

"""What quantization costs in quality and buys in size, memory and speed: SmolLM2-135M, one run.

    python bench/quantize.py [--windows 16] [--kl-windows 4] [--rounds 5] [--new-tokens 64] [--compile]

The reference ("fp32") is the bundled GGUF dequantized to fp32. Every variant is made by slmkit,
saved as a checkpoint and loaded back, then measured on the same text: perplexity over `windows`
x 512 tokens from the end of the shared WikiText-2 valid text (calibration reads only its start),
KL(reference || variant) of next-token distributions on the first `kl-windows` windows, checkpoint
file size, peak resident memory of a fresh process that loads the checkpoint and generates 16 tokens,
and batch-1 decode tokens/s (greedy, 64 new tokens after a 32-token prompt; variants interleaved
over `rounds` and the median kept; with --compile, fp32, int8 and int4 g128 are also timed
through torch.compile, as `slm generate --compile` runs them). Where llama-cpp-python is installed,
llama.cpp runs our Q8_0 and Q4_0 GGUF exports of the reference on the same windows, and the GGUF
exports of the quantized variants beside their slmkit rows: int8 as q8_0 and GPTQ int4 as q4_1
(its own codes) and as q4_0 (rounded a second time). Writes bench/results/quantize.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit.compress.quant.quantize import CALIBRATED, QuantConfig, quantize_model  # noqa: E402
from slmkit.data.calibration import calibration_ids  # noqa: E402
from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.infer.engine import Engine  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.interop.hf import save_checkpoint, save_hf  # noqa: E402
from slmkit.load import load  # noqa: E402

WINDOW = 512
VARIANTS = {  # name -> QuantConfig settings (None: a float checkpoint)
    "fp32": None, "bf16": None,
    "int8": dict(method="int8"),
    "int4-rtn-g128": dict(method="int4", group_size=128, pad_groups=True),
    "int4-rtn-g32": dict(method="int4", group_size=32),
    "int4-rtn-g64": dict(method="int4", group_size=64),
    "int4-rtn-g64-untied": dict(method="int4", group_size=64, tie=False, head_bits=4),  # as before: float embedding
    "gptq-int4-g128": dict(method="gptq", group_size=128, pad_groups=True),
    "gptq-int4-g64": dict(method="gptq", group_size=64),
    "awq-int4-g128": dict(method="awq", group_size=128, pad_groups=True),
}


def eval_windows(tokenizer, count: int) -> torch.Tensor:
    data = shared_data_dir()
    if data is None:
        sys.exit("the shared data directory (../shared/data) is needed for the evaluation text")
    text = (data / "corpus" / "wikitext2" / "valid.txt").read_text()
    ids = tokenizer.encode(text[-400_000:], add_special=False)  # calibration reads the first 400,000 chars
    ids = ids[-count * WINDOW:]
    return torch.tensor(ids).reshape(count, WINDOW)


@torch.inference_mode()
def logprobs(model, window: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(window[None, :-1]).float(), dim=-1)[0]  # (T-1, V)


def quality(model, windows: torch.Tensor, reference: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity over all windows, mean KL(reference || model) over the reference windows)."""
    nll, kls = [], []
    for i, window in enumerate(windows):
        lp = logprobs(model, window)
        nll.append(-lp.gather(-1, window[1:, None]).mean().item())
        if i < len(reference):
            kls.append((reference[i].exp() * (reference[i] - lp)).sum(-1).mean().item())
    return math.exp(statistics.mean(nll)), statistics.mean(kls)


def make_variant(name: str, settings: dict | None, out: Path, reference, tokenizer) -> tuple[Path, float, str]:
    if settings is None:
        save_hf(reference, tokenizer, out, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
        return out, 0.0, "float checkpoint"
    model = copy.deepcopy(reference)  # quantization works in place; the reference stays for KL
    started = time.perf_counter()
    cfg = QuantConfig(**settings)
    ids = (calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size)
           if cfg.method in CALIBRATED else None)
    report = quantize_model(model, cfg, ids)
    save_checkpoint(model, tokenizer, out)
    return out, time.perf_counter() - started, report.summary()


def peak_memory_mib(path: Path, dtype: str) -> float:
    """Peak resident memory (VmHWM) of a fresh process that loads the checkpoint and generates 16 tokens."""
    code = (f"import torch; from slmkit.load import load; from slmkit.infer.engine import Engine; "
            f"from slmkit.infer.sampling import SamplingParams; m = load({str(path)!r}, dtype=torch.{dtype}).model; "
            f"Engine(m).generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=16)); "
            f"from slmkit.evals.device import peak_rss_mib; print(peak_rss_mib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return float(out.stdout.strip().splitlines()[-1])


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# -- llama.cpp on our GGUF exports ----------------------------------------------------------------


GGUF_OF_VARIANT = {"int8": ("q8_0",), "gptq-int4-g64": ("q4_1", "q4_0"), "int4-rtn-g64": ("q4_1",)}


def llama_cpp_rows(reference_model, tokenizer, windows, reference, args, runs: Path, paths: dict) -> dict:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows (pip install -e '.[llamacpp]')")
        return {}
    from slmkit.interop.gguf import write_gguf

    exports = [(f"llama.cpp-{kind}", reference_model, kind) for kind in ("q8_0", "q4_0")]
    for name, kinds in GGUF_OF_VARIANT.items():
        if name in paths:
            model = load(str(paths[name]), dtype=torch.float32).model
            exports += [(f"llama.cpp-{name}-{kind}", model, kind) for kind in kinds]
    rows = {}
    for name, model, kind in exports:
        path = write_gguf(model, tokenizer, runs / f"{name}.gguf", kind)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW + 64, logits_all=True, verbose=False,
                              n_threads=torch.get_num_threads(), n_batch=WINDOW)
        nll, kls = [], []
        for i, window in enumerate(windows):
            llm.reset()
            llm.eval(window[:-1].tolist())
            lp = torch.log_softmax(torch.from_numpy(llm.scores[: WINDOW - 1].copy()).float(), dim=-1)
            nll.append(-lp.gather(-1, window[1:, None]).mean().item())
            if i < len(reference):
                kls.append((reference[i].exp() * (reference[i] - lp)).sum(-1).mean().item())
        speeds = []
        prompt = windows[0][:32].tolist()
        for _ in range(args.rounds):
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                token = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
                llm.eval([token])
            speeds.append(args.new_tokens / (time.perf_counter() - start))
        rows[name] = {"ppl": math.exp(statistics.mean(nll)), "kl": statistics.mean(kls),
                                     "file_mib": path.stat().st_size / 2**20,
                                     "decode_tok_s": statistics.median(speeds), "peak_mib": None}
        del llm
    return rows


# -- main -----------------------------------------------------------------------------------------


COMPILED = ("fp32", "int8", "int4-rtn-g128")  # `--compile` also times these through torch.compile


def decode_speeds(paths: dict[str, Path], dtypes: dict[str, torch.dtype], prompt: list[int], args) -> dict:
    """(name, compiled) -> median decode tokens/s; every engine runs once per round, interleaved."""
    engines = {(name, False): Engine(load(str(path), dtype=dtypes[name]).model) for name, path in paths.items()}
    if args.compile:
        engines.update({(name, True): Engine(load(str(paths[name]), dtype=dtypes[name]).model, compile=True)
                        for name in COMPILED if name in paths})
    speeds: dict[tuple[str, bool], list[float]] = {key: [] for key in engines}
    params = SamplingParams(max_new_tokens=args.new_tokens)
    for key, engine in engines.items():  # the compiled ones compile here, outside the timed rounds
        if key[1]:
            engine.generate([prompt], params)
    for _ in range(args.rounds):
        for key, engine in engines.items():
            engine.reset()
            speeds[key].append(engine.generate([prompt], params)[0].decode_tokens_per_second)
    return {key: statistics.median(v) for key, v in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help=f"{WINDOW}-token windows for perplexity")
    parser.add_argument("--kl-windows", type=int, default=4, help="windows for the KL divergence")
    parser.add_argument("--rounds", type=int, default=5, help="decode timing rounds (median kept)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing")
    parser.add_argument("--compile", action="store_true",
                        help=f"also time {', '.join(COMPILED)} through torch.compile (slm generate --compile); "
                             "adds ~6 min of compiling")
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure checkpoints already in --runs instead of quantizing again")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-quantize"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    reference_loaded = load("smollm2-135m-instruct", dtype=torch.float32)
    tokenizer, reference_model = reference_loaded.tokenizer, reference_loaded.model
    windows = eval_windows(tokenizer, args.windows)
    reference = [logprobs(reference_model, w) for w in windows[: args.kl_windows]]
    names = args.only or list(VARIANTS)
    rows, paths, dtypes = {}, {}, {}
    for name in names:
        print(f"== {name}")
        previous = runs / name / "made.json"
        if args.reuse and previous.is_file():
            path, made = runs / name, json.loads(previous.read_text())
            seconds, summary = made["seconds"], made["summary"]
        else:
            shutil.rmtree(runs / name, ignore_errors=True)
            path, seconds, summary = make_variant(name, VARIANTS[name], runs / name, reference_model, tokenizer)
            previous.write_text(json.dumps({"seconds": seconds, "summary": summary}))
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        model = load(str(path), dtype=dtype).model
        ppl, kl = quality(model, windows, reference)
        paths[name], dtypes[name] = path, dtype
        rows[name] = {"ppl": ppl, "kl": kl, "file_mib": weights_bytes(path) / 2**20, "quantize_s": round(seconds, 1),
                      "peak_mib": peak_memory_mib(path, str(dtype).removeprefix("torch.")), "summary": summary}
        print(f"   ppl {ppl:.3f}  KL {kl:.5f}  {rows[name]['file_mib']:.1f} MiB  {summary}")
        del model
    prompt = windows[0][:32].tolist()
    for (name, compiled), speed in decode_speeds(paths, dtypes, prompt, args).items():
        rows[name]["decode_compiled_tok_s" if compiled else "decode_tok_s"] = speed
    rows.update(llama_cpp_rows(reference_model, tokenizer, windows, reference, args, runs, paths))
    report = {"bench": "quantize", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "eval_tokens": args.windows * WINDOW, "kl_tokens": args.kl_windows * (WINDOW - 1),
              "rows": rows, "targets": targets(rows), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def targets(rows: dict) -> dict:
    """The issue's acceptance checks, computed from this run's rows (absent rows give None)."""
    def get(name, key):
        return rows.get(name, {}).get(key)

    out = {}
    bf16 = get("bf16", "file_mib")
    for name, most in (("int8", 0.6), ("int4-rtn-g64", 0.35), ("gptq-int4-g64", 0.35)):
        if bf16 and get(name, "file_mib"):
            out[f"{name}_size_at_most_{most}x_bf16"] = get(name, "file_mib") / bf16 <= most
    for name, kind in (("gptq-int4-g64", "q4_1"), ("int8", "q8_0")):  # the GGUF keeps the model's quality
        ours, theirs = get(name, "ppl"), get(f"llama.cpp-{name}-{kind}", "ppl")
        if ours and theirs:
            out[f"{name}_gguf_{kind}_ppl_within_1%"] = abs(theirs / ours - 1) <= 0.01
    ref = get("fp32", "ppl")
    if ref and get("int8", "ppl"):
        out["int8_ppl_within_0.5%"] = get("int8", "ppl") / ref - 1 <= 0.005
    rtn = get("int4-rtn-g128", "ppl")
    for method in ("gptq-int4-g128", "awq-int4-g128"):
        if ref and rtn and get(method, "ppl"):
            out[f"{method}_halves_rtn_increase"] = (get(method, "ppl") - ref) <= 0.5 * (rtn - ref)
    for key, suffix in (("decode_tok_s", ""), ("decode_compiled_tok_s", "_compiled")):
        base = get("fp32", key)
        if not base:
            continue
        if get("int8", key):
            out[f"int8_decode_1.5x{suffix}"] = get("int8", key) / base >= 1.5
        for name in ("int4-rtn-g128", "int4-rtn-g32"):
            if get(name, key):
                out[f"{name}_decode_2x{suffix}"] = get(name, key) / base >= 2.0
    return out


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = report["rows"]
    compiled = any("decode_compiled_tok_s" in r for r in rows.values())
    keys = ("decode_tok_s", "decode_compiled_tok_s") if compiled else ("decode_tok_s",)
    table = Table(title=f"SmolLM2-135M quantized ({report['eval_tokens']:,} WikiText-2 tokens, "
                        f"{report['threads']} threads)")
    columns = ["variant", "ppl", "KL", "file MiB", "peak MiB", "decode tok/s", "x fp32"]
    columns += ["compiled tok/s", "x fp32 compiled"] if compiled else []
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for name, r in rows.items():
        cells = [name, f"{r['ppl']:.3f}", f"{r['kl']:.5f}", f"{r['file_mib']:.1f}",
                 f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"]
        for key in keys:
            speed, base = r.get(key), rows.get("fp32", {}).get(key)
            cells += [f"{speed:.1f}" if speed else "-", f"{speed / base:.2f}" if speed and base else "-"]
        table.add_row(*cells)
    Console().print(table)
    for check, ok in report["targets"].items():
        print(f"{'PASS' if ok else 'MISS'}  {check}")


if __name__ == "__main__":
    main()

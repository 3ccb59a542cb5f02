"""Phones and edge boxes: SmolLM2-135M exported for ExecuTorch (XNNPACK) and ONNX Runtime GenAI beside
llama.cpp, each file run by its own runtime from Python, one run on this machine.

    python bench/edge.py [--threads 1,2] [--prompt-tokens 128] [--new-tokens 64] [--runs 3] [--reexport]
                         [--lora-rows 0] [--skip-lora] [--reuse]

Files (made once under runs/bench-edge/ by the `slm export` jobs and reused; --reexport makes them
again, with their export times): GGUF Q4_0 and Q8_0, ExecuTorch 8da4w / int8 / fp32 (512-token
cache), ONNX int4 / fp32.

1. Device table: `slmkit.evals.device.measure` (what `slm bench` runs: a fresh process per file) on
   every file and on torch fp32, at each thread count: file MiB, load s, TTFT, decode tok/s at batch
   1, peak RSS of the process. llama.cpp's context is the prompt and new tokens (192 by default);
   the phone files hold the 512-token cache they were exported with (part 4 compares at 512 each). Ratios are taken within the run, at the same thread count and at each
   runtime's best.
2. Agreement: greedy 32 tokens after 8 held-out chat prompts (Self-Instruct's user-oriented
   instructions, never trained on) from the fp32 exports against slmkit's torch fp32; KL per token of
   every export against slmkit fp32, teacher-forced over 256 tokens of WikiText-2 valid text.
3. Symptom2Disease LoRA (configs/finetune/symptom2disease-lora.yaml, trained here once into
   runs/bench-edge/s2d-lora unless present), merged and exported as ExecuTorch 8da4w and ONNX int4:
   exact match of the greedy answer (the `slm eval` task's metric) on the test split (never trained
   or tuned on) against the merged model in slmkit. --lora-rows limits the rows (0: all).

4. At the same 512-token context (llama.cpp given `--context 512`): LiteRT int4 / int8 (slm export
   litert, 512-token caches), when .venv-litert exists (`make
   litert-check` makes it: LiteRT cannot share .venv with the test extras): the same device row,
   measured by that environment's interpreter, beside llama.cpp Q4_0 and ExecuTorch 8da4w measured
   again in between, and its KL per token on the same text.

Writes bench/results/edge.json and prints the tables. Targets (issue 32): ExecuTorch 8da4w decode
>= 0.7x llama.cpp Q4_0, file <= 1.1x the Q4_0 GGUF, peak RSS <= 1.2x llama.cpp's; ONNX int4 decode
>= 0.7x Q4_0 and file <= 1.1x; fp32 exports' greedy tokens equal slmkit's; the LoRA's accuracy
within 2 points of slmkit's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402

from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.evals.device import BenchSettings, ModelBench, measure  # noqa: E402
from slmkit.generate import TextGenerator  # noqa: E402
from slmkit.infer.engine import Engine  # noqa: E402
from slmkit.infer.executorch_runtime import ExecuTorchEngine  # noqa: E402
from slmkit.infer.litert_runtime import LiteRTEngine  # noqa: E402
from slmkit.infer.onnx_runtime import OnnxEngine  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.interop.hf import save_hf  # noqa: E402
from slmkit.jobs.export import ExecutorchJob, GgufJob, OnnxJob, run_executorch, run_gguf, run_onnx  # noqa: E402
from slmkit.load import load  # noqa: E402
from slmkit.runtime import Runtime  # noqa: E402

MODEL = "smollm2-135m-instruct"
RUNS = ROOT / "runs" / "bench-edge"
OUT = ROOT / "bench" / "results" / "edge.json"
CACHE = 512
FILES = {  # name -> (path under RUNS, job that makes it)
    "llama.cpp Q4_0": ("smollm2-q4_0.gguf", lambda src, out: run_gguf(GgufJob(src, out, "q4_0"))),
    "llama.cpp Q8_0": ("smollm2-q8_0.gguf", lambda src, out: run_gguf(GgufJob(src, out, "q8_0"))),
    "ExecuTorch 8da4w": ("smollm2-8da4w.pte", lambda src, out: run_executorch(ExecutorchJob(src, out, "8da4w", CACHE))),
    "ExecuTorch int8": ("smollm2-int8.pte", lambda src, out: run_executorch(ExecutorchJob(src, out, "int8", CACHE))),
    "ExecuTorch fp32": ("smollm2-fp32.pte", lambda src, out: run_executorch(ExecutorchJob(src, out, "fp32", CACHE))),
    "ONNX int4": ("smollm2-onnx-int4", lambda src, out: run_onnx(OnnxJob(src, out, "int4"))),
    "ONNX fp32": ("smollm2-onnx-fp32", lambda src, out: run_onnx(OnnxJob(src, out, "fp32"))),
}


def made(source: str, prefix: str, names, reexport: bool) -> dict[str, dict]:
    """Each file exported once (timed), or reused."""
    out = {}
    for name in names:
        file, job = FILES[name]
        path = RUNS / f"{prefix}{file}"
        record = path.with_name(path.name + ".made.json")
        if reexport or not record.is_file() or not path.exists():
            print(f"exporting {name} -> {path}", flush=True)
            if path.exists() and path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            started = time.perf_counter()
            job(source, str(path))
            record.write_text(json.dumps({"export_s": time.perf_counter() - started}))
        out[name] = {"path": str(path), **json.loads(record.read_text())}
    return out


def device_rows(files: dict, threads: list[int], args) -> list[dict]:
    rows = []
    for t in threads:
        specs = [("torch fp32", MODEL, "torch")] + [(n, f["path"], "llamacpp" if n.startswith("llama") else "auto")
                                                    for n, f in files.items()]
        for name, spec, engine in specs:
            settings = BenchSettings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                                     runtime=Runtime(engine=engine, dtype="float32", threads=t))
            print(f"measuring {name} at {t} thread(s)...", flush=True)
            rows.append(device_row(name, t, measure(spec, settings)))
    return rows


def heldout_prompts(tokenizer, n: int) -> list[list[int]]:
    path = shared_data_dir() / "tasks" / "self_instruct_human" / "user_oriented_instructions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    prompts = []
    for r in rows:
        text = r["instruction"] + ("\n\n" + r["instances"][0]["input"] if r["instances"][0].get("input") else "")
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        prompts.append(tokenizer.encode(chat))
    return prompts


def heldout_text(tokenizer, n: int) -> list[int]:
    path = shared_data_dir() / "corpus" / "wikitext2"
    text = next(p for p in sorted(path.iterdir()) if "valid" in p.name).read_text()
    return tokenizer.encode(text[len(text) // 2:])[:n]


def teacher_forced(kind: str, path: str, sequence: list[int]) -> torch.Tensor:
    """Log-probabilities (T-1, V) for positions 1.. of `sequence`, one token fed at a time."""
    if kind == "executorch":
        engine = ExecuTorchEngine(path)
        rows = [engine.forward([tok], i)[0] for i, tok in enumerate(sequence[:-1])]
    elif kind == "onnx":
        import onnxruntime_genai as og
        model = og.Model(path)
        search = og.GeneratorParams(model)
        search.set_search_options(max_length=len(sequence) + 1)
        generator = og.Generator(model, search)
        rows = []
        for tok in sequence[:-1]:
            generator.append_tokens([tok])
            rows.append(torch.from_numpy(generator.get_logits()[0, -1].copy()))
    else:
        from slmkit.infer.llamacpp import LlamaCppEngine, runtime_files
        files = runtime_files(path, progress=lambda _m: None)
        engine = LlamaCppEngine.for_files(files, len(sequence) + 8)
        rows = list(engine.run([(0, tok, i, True) for i, tok in enumerate(sequence[:-1])]))
    return torch.log_softmax(torch.stack(rows).float(), -1)


def agreement(files: dict) -> dict:
    loaded = load(MODEL, dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = heldout_prompts(tokenizer, 8)
    params = SamplingParams(max_new_tokens=32)
    reference = Engine(model)
    want = [reference.generate([p], params)[0].tokens for p in prompts]
    greedy = {}
    for name, engine in (("ExecuTorch fp32", ExecuTorchEngine(files["ExecuTorch fp32"]["path"])),
                         ("ONNX fp32", OnnxEngine(files["ONNX fp32"]["path"]))):
        got = [engine.generate([p], params)[0].tokens for p in prompts]
        greedy[name] = {"equal": sum(g == w for g, w in zip(got, want)), "of": len(prompts)}
    sequence = heldout_text(tokenizer, 256)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([sequence]))[0, :-1].float(), -1)
    kl = {}
    for name, f in files.items():
        kind = "executorch" if name.startswith("ExecuTorch") else "onnx" if name.startswith("ONNX") else "llamacpp"
        got = teacher_forced(kind, f["path"], sequence)
        kl[name] = (ref.exp() * (ref - got)).sum(-1).mean().item()
    return {"greedy_32_tokens": greedy, "kl_per_token": kl, "kl_tokens": len(sequence) - 1}


def lora_accuracy(args) -> dict:
    from slmkit.evals.tasks.chat import ChatClassification

    run = RUNS / "s2d-lora"
    if not (run / "adapter_config.json").is_file():
        print("training the Symptom2Disease LoRA (configs/finetune/symptom2disease-lora.yaml)...", flush=True)
        subprocess.run([sys.executable, "-m", "slmkit.cli", "finetune", "--config",
                        str(ROOT / "configs" / "finetune" / "symptom2disease-lora.yaml"), f"out={run}"], check=True)
    merged = RUNS / "s2d-merged"
    if not (merged / "config.json").is_file():
        loaded = load(str(run), dtype=torch.float32, merge=True)
        save_hf(loaded.model, loaded.tokenizer, merged)
    files = made(str(merged), "s2d-", ["ExecuTorch 8da4w", "ONNX int4"], args.reexport)
    loaded = load(str(merged), dtype=torch.float32)
    task = ChatClassification(shared_data_dir() / "eval", "symptom2disease")
    task.bind(loaded.tokenizer)
    docs = task.eval_docs().rows
    docs = docs[:args.lora_rows] if args.lora_rows else docs
    engines = {"slmkit torch fp32 (merged)": Engine(loaded.model),
               "ExecuTorch 8da4w": ExecuTorchEngine(files["ExecuTorch 8da4w"]["path"]),
               "ONNX int4": OnnxEngine(files["ONNX int4"]["path"])}
    params = SamplingParams(max_new_tokens=task.max_new_tokens)
    out = {}
    for name, engine in engines.items():
        generator = TextGenerator(None, loaded.tokenizer, engine=engine)
        hits = [task.score_answer(d, generator.complete([task.context(d, [])], params)[0].text)["exact_match"]
                for d in docs]
        out[name] = {"exact_match": sum(hits) / len(hits), "n": len(hits)}
        print(f"  {name}: {out[name]['exact_match']:.3f} on {len(hits)} test rows", flush=True)
    return {"accuracy": out, "files": files}


LITERT_PYTHON = ROOT / ".venv-litert" / "bin" / "python"
LITERT_FILES = {"LiteRT int4": ("smollm2-litert-int4.tflite", "int4"), "LiteRT int8": ("smollm2-litert-int8.tflite", "int8")}


def in_litert(*args: str) -> str:
    """Run a command of .venv-litert's interpreter here; its last stdout line."""
    done = subprocess.run([str(LITERT_PYTHON), *args], capture_output=True, text=True, env={**os.environ},
                          cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed in .venv-litert: {done.stderr.strip()[-800:]}")
    return done.stdout.strip().splitlines()[-1]


def litert_part(threads: list[int], args) -> dict:
    """LiteRT's files made and measured in .venv-litert, llama.cpp Q4_0 and ExecuTorch 8da4w measured again
    beside them (interleaved, the same 512-token context)."""
    files = {}
    for name, (file, precision) in LITERT_FILES.items():
        path = RUNS / file
        record = path.with_name(path.name + ".made.json")
        if args.reexport or not record.is_file():
            started = time.perf_counter()
            in_litert("-m", "slmkit.cli", "export", "litert", MODEL, str(path), "--precision", precision,
                      "--max-seq-len", str(CACHE), "--force")
            record.write_text(json.dumps({"export_s": time.perf_counter() - started}))
        files[name] = {"path": str(path), **json.loads(record.read_text())}
    rows = []
    for t in threads:
        settings = BenchSettings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                                 runtime=Runtime(engine="auto", dtype="float32", threads=t, context=CACHE))
        q4 = BenchSettings(**{**settings.__dict__,
                              "runtime": Runtime(engine="llamacpp", dtype="float32", threads=t, context=CACHE)})
        beside = [("llama.cpp Q4_0", {"path": str(RUNS / FILES["llama.cpp Q4_0"][0])}),
                  ("ExecuTorch 8da4w", {"path": str(RUNS / FILES["ExecuTorch 8da4w"][0])})]
        for name, f in [*beside, *files.items()]:
            print(f"measuring {name} at {t} thread(s)...", flush=True)
            if name.startswith("llama"):
                m = measure(f["path"], q4)
            elif name.startswith("ExecuTorch"):
                m = measure(f["path"], settings)
            else:
                m = ModelBench(**json.loads(in_litert("-m", "slmkit.evals.device", f["path"], json.dumps(asdict(settings)))))
            rows.append(device_row(name, t, m))
    kl = {name: json.loads(in_litert(str(ROOT / "bench" / "edge.py"), "--litert-kl", f["path"]))["kl"]
          for name, f in files.items()}
    return {"files": files, "device": rows, "kl_per_token": kl}


def litert_kl(path: str) -> None:
    """(run in .venv-litert) KL per token of a LiteRT file against slmkit fp32 on the held-out text."""
    loaded = load(MODEL, dtype=torch.float32)
    sequence = heldout_text(loaded.tokenizer, 256)
    with torch.no_grad():
        ref = torch.log_softmax(loaded.model(torch.tensor([sequence]))[0, :-1].float(), -1)
    engine = LiteRTEngine(path)
    got = torch.log_softmax(torch.cat([engine.forward([tok], i) for i, tok in enumerate(sequence[:-1])]), -1)
    print(json.dumps({"kl": (ref.exp() * (ref - got)).sum(-1).mean().item()}))


def device_row(name: str, threads: int, m) -> dict:
    b = m.batches["1"]
    return {"runtime": name, "threads": threads, "file_mib": m.file_mib, "load_s": m.load_s,
            "ttft_s": b["ttft_s"]["median"], "prefill_tok_s": b["prefill_tok_s"]["median"],
            "decode_tok_s": b["decode_tok_s"]["median"],
            "decode_range": [b["decode_tok_s"]["min"], b["decode_tok_s"]["max"]], "peak_mib": m.peak_mib}


def table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M on {report['cpu']}: {report['prompt_tokens']}-token prompt, "
                    f"{report['new_tokens']} new tokens, batch 1, median of {report['runs']}")
    for c in ("runtime", "threads", "file MiB", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "peak MiB"):
        t.add_column(c, justify="left" if c == "runtime" else "right")
    for r in report["device"] + report.get("litert", {}).get("device", []):
        t.add_row(r["runtime"], str(r["threads"]), f"{r['file_mib']:.1f}", f"{r['load_s']:.2f}", f"{r['ttft_s']:.3f}",
                  f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['peak_mib']:.0f}")
    Console().print(t)
    Console().print_json(json.dumps({k: report[k] for k in ("targets", "agreement", "lora") if k in report}))
    if "litert" in report:
        Console().print_json(json.dumps({"litert_kl_per_token": report["litert"]["kl_per_token"]}))


def targets(rows: list[dict], files: dict) -> dict:
    """The issue's ratios: at the same thread count, and each runtime at its best thread count."""
    def pick(name, threads=None):
        cands = [r for r in rows if r["runtime"] == name and (threads is None or r["threads"] == threads)]
        return max(cands, key=lambda r: r["decode_tok_s"])

    out = {}
    q4 = FILES["llama.cpp Q4_0"]
    for name in ("ExecuTorch 8da4w", "ONNX int4"):
        same = {t: pick(name, t)["decode_tok_s"] / pick("llama.cpp Q4_0", t)["decode_tok_s"]
                for t in sorted({r["threads"] for r in rows})}
        best, base = pick(name), pick("llama.cpp Q4_0")
        size = Path(files[name]["path"])
        size = size.stat().st_size if size.is_file() else sum(f.stat().st_size for f in size.iterdir() if f.is_file())
        out[name] = {"decode_x_q4_0_same_threads": same,
                     "decode_x_q4_0_best": best["decode_tok_s"] / base["decode_tok_s"],
                     "best_threads": [best["threads"], base["threads"]],
                     "file_x_q4_0": size / (RUNS / q4[0]).stat().st_size,
                     "peak_rss_x_llamacpp_same_threads": {t: pick(name, t)["peak_mib"] / pick("llama.cpp Q4_0", t)["peak_mib"]
                                                          for t in sorted({r["threads"] for r in rows})}}
    return out


def part(name: str, reuse: bool, measure_it):
    """A part's result, measured now (and kept under runs/bench-edge/parts/) or, with --reuse, read back."""
    path = RUNS / "parts" / f"{name}.json"
    if reuse and path.is_file():
        return json.loads(path.read_text())
    result = measure_it()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--lora-rows", type=int, default=0)
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse parts already measured (runs/bench-edge/parts)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--litert-kl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.litert_kl:
        return litert_kl(args.litert_kl)
    RUNS.mkdir(parents=True, exist_ok=True)
    files = made(MODEL, "", FILES, args.reexport)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "runs": args.runs, "files": files}
    report["device"] = part("device", args.reuse, lambda: device_rows(files, [int(t) for t in args.threads.split(",")], args))
    report["targets"] = targets(report["device"], files)
    report["agreement"] = part("agreement", args.reuse, lambda: agreement(files))
    if not args.skip_lora:
        report["lora"] = part("lora", args.reuse, lambda: lora_accuracy(args))
    if LITERT_PYTHON.is_file():
        threads = [int(t) for t in args.threads.split(",")]
        report["litert"] = part("litert", args.reuse, lambda: litert_part(threads, args))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    table(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

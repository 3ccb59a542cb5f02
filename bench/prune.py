"""What pruning and low-rank factorization cost in quality and buy in size and speed: SmolLM2-135M.

    python bench/prune.py [--windows 16] [--items 500] [--heal-steps 200] [--only PART,...]

Parts (each adds its rows to bench/results/prune.json, so they can run one at a time):
  reference     the bundled SmolLM2-135M dequantized to fp32
  unstructured  50% and 2:4: magnitude, Wanda, SparseGPT
  lowrank       10/20/30% fewer linear parameters: plain SVD and whitened SVD (SVD-LLM)
  structured    width (<= 95M parameters) and depth (22 layers), each healed by `slm distill` from the
                original, and the same shapes distilled from random weights with the same budget
  gguf          the healed width model through `slm quantize --method gptq` and
                `slm export gguf --type q4_k_m`, continued by llama.cpp and by slmkit
  accuracy      ARC-Easy and PIQA of every checkpoint measured so far (the slowest part)

Every variant is saved as a checkpoint, loaded back and measured on the same text: perplexity on
`windows` x 512 tokens from the end of the shared WikiText-2 valid text (calibration reads its
first 400,000 characters; healing reads everything before the last 400,000, plus Project
Gutenberg), accuracy on the first `items` items of ARC-Easy and PIQA (their default shots), the
checkpoint's file size, and batch-1 greedy decode tokens/s interleaved with the original in the
same run (median of `rounds`).
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quantize import eval_windows, logprobs  # noqa: E402

from slmkit.compress.prune import PruneConfig, prune_model  # noqa: E402
from slmkit.data.calibration import calibration_ids  # noqa: E402
from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.evals.lm import LocalLM  # noqa: E402
from slmkit.evals.runner import run_task  # noqa: E402
from slmkit.evals.tasks import make_task  # noqa: E402
from slmkit.fileio import write_json  # noqa: E402
from slmkit.infer.engine import Engine  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.interop.hf import save_checkpoint  # noqa: E402
from slmkit.load import load, random_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prune.json"
RUNS = ROOT / "runs" / "prune-bench"
PARTS = ("reference", "unstructured", "lowrank", "structured", "gguf", "accuracy")
TASKS = ("arc_easy", "piqa")
PROMPT = "The history of the city begins in the twelfth century, when"


# -- measuring one variant ------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    nll = [-logprobs(model, w).gather(-1, w[1:, None]).mean().item() for w in windows]
    return math.exp(statistics.mean(nll))


def accuracy(model, tokenizer, items: int) -> dict[str, float]:
    lm = LocalLM(model, tokenizer)
    out = {}
    for name in TASKS:
        task = make_task(name, shared_data_dir() / "eval")
        out[name] = run_task(lm, task, task.default_shots, limit=items, progress=False).metrics["acc"]
    return out


def interleaved_medians(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each timing function (tokens/s), one warm-up call each, rounds interleaved so that
    noise on the machine hits every variant alike."""
    for run in runs.values():
        run()
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            speeds[name].append(run())
    return {name: statistics.median(v) for name, v in speeds.items()}


def decode_speeds(models: dict, prompt: list[int], rounds: int, new_tokens: int) -> dict[str, float]:
    """Batch-1 greedy decode tokens/s of each model in slmkit's engine."""
    params = SamplingParams(max_new_tokens=new_tokens)  # no stop tokens: every round decodes new_tokens

    def timer(engine: Engine) -> Callable[[], float]:
        def tok_s() -> float:
            start = time.perf_counter()
            return len(engine.generate([prompt], params)[0].tokens) / (time.perf_counter() - start)
        return tok_s

    return interleaved_medians({name: timer(Engine(m)) for name, m in models.items()}, rounds)


def file_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def measure(model, tokenizer, path: Path, ctx) -> dict:
    model = load(str(path), dtype=torch.float32).model  # measured as loaded back from its checkpoint
    row = {"ppl": perplexity(model, ctx.windows), "file_mib": file_mib(path),
           "params": sum(p.numel() for p in model.parameters())}
    row["path"] = str(path.relative_to(ROOT))
    row["measured"] = f"{time.strftime('%Y-%m-%d')}, {_machine()}"
    print(f"  {path.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()), flush=True)
    return row


# -- parts ----------------------------------------------------------------------------------------


def part_accuracy(ctx) -> dict:
    """ARC-Easy and PIQA for every measured checkpoint (the slowest measurement, so its own part)."""
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else {}
    out = {}
    for name, row in rows.items():
        if "path" not in row or (ctx.skip_measured and "arc_easy" in row) or (ctx.rows and name not in ctx.rows):
            continue
        print(f"  accuracy: {name}", flush=True)
        model = load(str(ROOT / row["path"]), dtype=torch.float32).model
        out[name] = {**row, **accuracy(model, ctx.tokenizer, ctx.items), "items": ctx.items}
        _save_rows(out)  # row by row: the slowest part keeps what it measured if stopped
    return out


def _save_rows(rows: dict) -> None:
    doc = json.loads(RESULTS.read_text())
    for name, row in rows.items():
        doc["rows"].setdefault(name, {}).update(row)
    write_json(RESULTS, doc)


def part_reference(ctx) -> dict:
    path = RUNS / "original"
    save_checkpoint(ctx.original, ctx.tokenizer, path)
    return {"original": measure(ctx.original, ctx.tokenizer, path, ctx)}


def part_unstructured(ctx) -> dict:
    rows = {}
    for target in (dict(sparsity=0.5), dict(pattern="2:4")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            name = f"{method}-{'50' if 'sparsity' in target else '2of4'}"
            model = copy.deepcopy(ctx.original)
            started = time.perf_counter()
            report = prune_model(model, PruneConfig(method=method, **target), ctx.calib, progress=False)
            seconds = time.perf_counter() - started
            save_checkpoint(model, ctx.tokenizer, RUNS / name)
            rows[name] = {**measure(model, ctx.tokenizer, RUNS / name, ctx), "seconds": seconds,
                          "summary": report.summary()}
    return rows


def part_lowrank(ctx) -> dict:
    from slmkit.compress.lowrank import LowRankConfig, factorize_model

    rows = {}
    for fewer in (10, 20, 30):
        for method in ("svd", "whitened"):
            name = f"{method}-{fewer}"
            model = copy.deepcopy(ctx.original)
            started = time.perf_counter()
            report = factorize_model(model, LowRankConfig(method=method, keep=1 - fewer / 100), ctx.calib,
                                     progress=False)
            seconds = time.perf_counter() - started
            save_checkpoint(model, ctx.tokenizer, RUNS / name)
            rows[name] = {**measure(model, ctx.tokenizer, RUNS / name, ctx), "seconds": seconds,
                          "summary": report.summary()}
    return rows


def heal_data() -> Path:
    """General English text that leaves out the evaluation windows, prepared with SmolLM2's tokenizer."""
    out = RUNS / "heal-data"
    if (out / "meta.json").is_file():
        return out
    data = shared_data_dir()
    text_dir = RUNS / "heal-text"
    text_dir.mkdir(parents=True, exist_ok=True)
    valid = (data / "corpus" / "wikitext2" / "valid.txt").read_text()
    (text_dir / "wikitext2-valid-head.txt").write_text(valid[:-400_000])  # evaluation reads from the last 400,000
    slm("prepare", str(text_dir), str(data / "corpus" / "gutenberg"), "near_dedup=false", "--out", str(out))
    return out


def slm(*args: str) -> str:
    command = [sys.executable, "-m", "slmkit.cli", *args]
    print("  $ slm", " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode:
        sys.exit(f"slm {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def heal(student: Path, recipe: str, run: Path, data: Path, steps: int) -> tuple[Path, dict]:
    """Distill `student` from the original; a finished run (its final/ and heal.json) is reused as it is."""
    if not (run / "final" / "config.json").is_file():
        shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts over: its budget must be whole
        started = time.perf_counter()
        slm("distill", "--config", str(ROOT / "configs" / "distill" / recipe), f"student={student}", f"out={run}",
            f"data={data}", f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
            f"max_train_tokens={steps * 4 * 256}", f"kd.cache={RUNS / 'teacher-cache'}")  # one teacher pass, shared
        write_json(run / "heal.json", {"heal_seconds": time.perf_counter() - started})
    return run / "final", heal_info(run)


def heal_info(run: Path) -> dict:
    """Tokens, final loss and wall time of a finished heal. A run without heal.json (one whose bench
    process was stopped after it finished) is timed from its files: first written to final/ saved."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    if (run / "heal.json").is_file():
        seconds = json.loads((run / "heal.json").read_text())["heal_seconds"]
    else:
        first = min(f.stat().st_mtime for f in run.iterdir() if f.is_file())
        seconds = max(f.stat().st_mtime for f in (run / "final").iterdir()) - first
    return {"heal_seconds": seconds, "heal_tokens": train_rows[-1]["tokens"], "final_train_loss": train_rows[-1]["loss"],
            "heal_steps": train_rows[-1]["step"]}  # steps count from 1


def part_structured(ctx) -> dict:
    """Prune to each shape, heal from the pruned weights and from random ones, and time each shape.

    Decode speed depends on the shape, not the weights, so each shape is timed on its pruned
    checkpoint (the healed one has the same shape) and the healed row carries the same figures.
    ctx.heal == "existing" starts no new healing run (finished ones are reused; the rest keep the rows
    an earlier run measured)."""
    from slmkit.compress.structured import StructuredConfig, prune_structured

    data = heal_data()
    if not (RUNS / "original" / "config.json").is_file():  # llama.cpp times its GGUF export
        save_checkpoint(ctx.original, ctx.tokenizer, RUNS / "original")
    rows, timed = {}, {"original": ctx.original}
    targets = {"width": (dict(params="95M"), "heal-width.yaml"), "depth": (dict(layers=22), "heal-depth.yaml")}
    for kind in ctx.kinds:
        target, recipe = targets[kind]
        pruned, report = prune_structured(copy.deepcopy(ctx.original), StructuredConfig(**target), ctx.calib,
                                          progress=False)
        save_checkpoint(pruned, ctx.tokenizer, RUNS / f"{kind}-pruned")
        rows[f"{kind}-pruned"] = {**measure(pruned, ctx.tokenizer, RUNS / f"{kind}-pruned", ctx),
                                  "summary": report.summary()}
        timed[f"{kind}-pruned"] = pruned
        if not (RUNS / f"{kind}-random" / "config.json").is_file():
            save_checkpoint(random_model(pruned.config, seed=0), ctx.tokenizer, RUNS / f"{kind}-random")
        for start in ("pruned", "random"):
            run = RUNS / f"heal-{kind}-{start}"
            if ctx.heal == "existing" and not (run / "final" / "config.json").is_file():
                print(f"  {run.name}: no finished run and --heal existing: its row stays as measured before")
                continue
            final, info = heal(RUNS / f"{kind}-{start}", recipe, run, data, ctx.heal_steps)
            rows[f"{kind}-{start}-healed"] = {**measure(None, ctx.tokenizer, final, ctx), **info}
    prompt = ctx.tokenizer.encode(PROMPT, add_special=False)
    speeds = decode_speeds(timed, prompt, ctx.rounds, ctx.new_tokens)
    fast = llama_cpp_speeds({name: RUNS / name for name in timed}, prompt, ctx.rounds, ctx.new_tokens)
    for name in timed:
        figures = {"decode_tok_s": speeds[name], "decode_vs_original": speeds[name] / speeds["original"]}
        if fast:
            figures.update(decode_tok_s_llama_cpp_q8_0=fast[name],
                           decode_vs_original_llama_cpp_q8_0=fast[name] / fast["original"])
        rows.setdefault(name, {}).update(figures)
        if name != "original":
            rows.setdefault(f"{name}-healed", {}).update(figures, decode_timed_on=f"{name} (the same shape)")
    return rows


def llama_cpp_speeds(paths: dict[str, Path], prompt: list[int], rounds: int, new_tokens: int) -> dict[str, float]:
    """Batch-1 greedy decode tokens/s in llama.cpp of each checkpoint exported to GGUF q8_0 (how a pruned
    model is deployed), rounds interleaved, median; {} without the [llamacpp] extra.

    Decode in slmkit's PyTorch engine pays a fixed per-layer dispatch cost that does not shrink with the
    widths; llama.cpp's does far less, so its ratio shows what fewer parameters buy once deployed."""
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp decode speeds (pip install -e '.[llamacpp]')")
        return {}
    llms = {}
    for name, path in paths.items():
        gguf = path.parent / f"{path.name}-q8_0.gguf"
        slm("export", "gguf", str(path), str(gguf), "--type", "q8_0")
        llms[name] = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def timer(llm) -> Callable[[], float]:
        def tok_s() -> float:
            start, n = time.perf_counter(), 0
            for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                n += 1
                if n == new_tokens:
                    break
            return n / (time.perf_counter() - start)
        return tok_s

    return interleaved_medians({name: timer(llm) for name, llm in llms.items()}, rounds)


def part_gguf(ctx) -> dict:
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no gguf row (pip install -e '.[llamacpp]')")
        return {}
    healed = RUNS / "heal-width-pruned" / "final"
    if not (healed / "config.json").is_file():
        sys.exit("run the structured part first (the healed width model is its input)")
    quantized, gguf = RUNS / "width-healed-gptq", RUNS / "width-healed-q4_k_m.gguf"
    slm("quantize", str(healed), "--method", "gptq", "--group-size", "64", "-o", str(quantized))
    slm("export", "gguf", str(quantized), str(gguf), "--type", "q4_k_m")
    model = load(str(gguf), dtype=torch.float32).model
    prompt = ctx.tokenizer.encode(PROMPT, add_special=False)
    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=32))[0].tokens
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if len(theirs) == len(ours):
            break
        theirs.append(int(token))
    same = int(np.argmin(np.array(ours) == np.array(theirs))) if ours != theirs else len(ours)
    with torch.inference_mode():  # slmkit's top-2 logit margin where the two first differ: a near tie or not
        logits = model(torch.tensor([prompt + ours]))[0, len(prompt) - 1 :].float()
    margins = (logits.topk(2).values[:, 0] - logits.topk(2).values[:, 1]).tolist()
    return {"width-healed-gptq-q4_k_m": {"ppl": perplexity(model, ctx.windows), "gguf_mib": gguf.stat().st_size / 2**20,
                                         "llama_cpp_same_tokens": same, "compared_tokens": len(ours),
                                         "margin_at_first_difference": margins[same] if same < len(ours) else None,
                                         "smallest_margin_before_it": min(margins[:same]) if same else None,
                                         "slmkit_text": ctx.tokenizer.decode(ours),
                                         "llama_cpp_text": ctx.tokenizer.decode(theirs)}}


# -- main -----------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        loaded = load("smollm2-135m-instruct", dtype=torch.float32)
        self.original, self.tokenizer = loaded.model, loaded.tokenizer
        self.windows = eval_windows(self.tokenizer, args.windows)
        self.calib = calibration_ids(self.tokenizer, None, args.calib_samples, 512, self.original.config.vocab_size)
        self.items, self.heal_steps, self.skip_measured = args.items, args.heal_steps, args.skip_measured
        self.rows = [r for r in args.rows.split(",") if r]
        self.rounds, self.new_tokens = args.rounds, args.new_tokens
        self.kinds, self.heal = [k for k in args.kinds.split(",") if k], args.heal


def verdicts(rows: dict) -> dict:
    """The acceptance targets, from whatever parts have been measured."""
    out = {}
    base = rows.get("original", {}).get("ppl")
    if base is None:
        return out
    def rise(name):  # noqa: E306
        return rows[name]["ppl"] - base if name in rows else None
    if all(f"{m}-50" in rows for m in ("magnitude", "wanda", "sparsegpt")):
        out["50%: wanda and sparsegpt add <= half of magnitude's rise"] = all(
            rise(f"{m}-50") <= 0.5 * rise("magnitude-50") for m in ("wanda", "sparsegpt"))
    if all(f"{m}-2of4" in rows for m in ("magnitude", "wanda", "sparsegpt")):
        p = {m: rows[f"{m}-2of4"]["ppl"] for m in ("magnitude", "wanda", "sparsegpt")}
        out["2:4: sparsegpt <= wanda < magnitude"] = p["sparsegpt"] <= p["wanda"] < p["magnitude"]
    if "svd-20" in rows and "whitened-20" in rows:
        out["20% fewer: whitened adds <= 1/3 of svd's rise"] = rise("whitened-20") <= rise("svd-20") / 3
    for kind in ("width", "depth"):
        healed, scratch = rows.get(f"{kind}-pruned-healed"), rows.get(f"{kind}-random-healed")
        if healed and scratch:
            out[f"{kind}: healed ppl <= 1.5x original"] = healed["ppl"] <= 1.5 * base
            out[f"{kind}: healed ppl >= 30% below random-init"] = healed["ppl"] <= 0.7 * scratch["ppl"]
            out[f"{kind}: decode >= 1.25x original (slmkit torch engine)"] = healed.get("decode_vs_original", 0) >= 1.25
            if "decode_vs_original_llama_cpp_q8_0" in healed:
                out[f"{kind}: decode >= 1.25x original (llama.cpp q8_0)"] = (
                    healed["decode_vs_original_llama_cpp_q8_0"] >= 1.25)
    if "width-pruned" in rows:
        out["width: <= 95M parameters"] = rows["width-pruned"]["params"] <= 95e6
    return out


def print_table(rows: dict) -> None:
    cols = ("ppl", "arc_easy", "piqa", "file_mib", "params", "decode_vs_original", "decode_vs_original_llama_cpp_q8_0")
    print(f"\n{'variant':28s}" + "".join(f"{c[:20]:>20s}" for c in cols))
    for name, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-':>20s}" if v is None else f"{v:>20.4g}" if isinstance(v, float) else f"{v:>20}")
        print(f"{name:28s}" + "".join(cells))
    for what, ok in verdicts(rows).items():
        print(f"{'PASS' if ok else 'MISS'}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="512-token perplexity windows")
    parser.add_argument("--items", type=int, default=500, help="ARC-Easy and PIQA items per checkpoint")
    parser.add_argument("--skip-measured", action="store_true", help="accuracy: skip rows that have it already")
    parser.add_argument("--rows", default="", help="accuracy: only these comma-separated rows (default: all)")
    parser.add_argument("--calib-samples", type=int, default=64, help="512-token calibration windows")
    parser.add_argument("--heal-steps", type=int, default=200, help="distillation steps for each healing run")
    parser.add_argument("--kinds", default="width,depth", help="structured: shapes to prune, heal and time")
    parser.add_argument("--heal", choices=("all", "existing"), default="all",
                        help="structured: run missing heals (all) or only reuse finished ones (existing)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode timing rounds")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timing round")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.only.split(",")
    if unknown := set(parts) - set(PARTS):
        sys.exit(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    torch.manual_seed(0)
    RUNS.mkdir(parents=True, exist_ok=True)
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    ctx = Context(args)
    for part in parts:
        print(f"== {part}", flush=True)
        started = time.perf_counter()
        for name, row in globals()[f"part_{part}"](ctx).items():  # merged: a part adds to rows, never drops
            doc["rows"].setdefault(name, {}).update(row)
        doc.setdefault("part_seconds", {})[part] = time.perf_counter() - started
        doc.setdefault("part_machine", {})[part] = f"{_machine()}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
        doc.update(machine=_machine(), threads=torch.get_num_threads(), settings=vars(args),
                   date=time.strftime("%Y-%m-%d"), verdicts=verdicts(doc["rows"]))
        write_json(RESULTS, doc)
    print_table(doc["rows"])


def _machine() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()

"""Fine-tuning benchmark: slmkit's fine-tuned SmolLM2-135M against classical and zero/few-shot
baselines measured in the same run, on test rows no model trained or tuned on.

Per task (the built-in splits of slmkit.data.tasks; settings were chosen on the validation split):
  - baselines: TF-IDF + logistic regression (scikit-learn; C chosen on validation) for the
    classification tasks, the abstract's lead sentence for SciTLDR, and the base model itself
    zero-shot (and 5-shot for classification), all through `slm eval`'s task code
  - fine-tuned: each method's recipe in configs/finetune/<task>-<method>.yaml, run in its own process
    (its own peak RSS), then scored on the test split by the same task code: accuracy by
    likelihood over the label set, exact match and hallucination rate of the free answer; ROUGE
    for summaries; plus trainable parameters, adapter size, training tokens/s and wall time
  - LoRA training speed against peft + transformers on the same batches, same weights, same
    threads, interleaved rounds (the ratio in the same run is the result)
  - one over-long run (no early stop until well past the best checkpoint) plotted: train vs
    validation loss, the gap, and the checkpoint that early stopping kept
  - preference tuning (bench/preference.py): DPO and ORPO, LoRA and full, on on-policy SciTLDR
    pairs: held-out win rate against the SFT model, validation reward accuracy, time, peak RSS

    python bench/finetune.py [--only s2d,sentiment,sst2,scitldr,speed,overfit,preference] [--methods lora,...]
                             [--reuse | --assemble]

Each part writes runs/bench-finetune/parts/<part>.json (--reuse skips finished parts; --assemble
measures nothing), then bench/results/finetune.json is assembled from the parts and a table printed.
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402

RUNS = ROOT / "runs" / "bench-finetune"
PARTS = RUNS / "parts"
OUT = ROOT / "bench" / "results" / "finetune.json"
BASE = "smollm2-135m-instruct"
CLASSIFICATION = {"symptom2disease": ("full", "lora", "dora", "qlora"), "sentiment": ("full", "lora", "dora", "qlora"),
                  "sst2": ("lora",)}
GENERATION = {"scitldr": ("lora",)}
EVAL_LIMIT = {"scitldr": 250}  # generation of ~30-token summaries; the first 250 of the shuffled test rows
SHORT = {"symptom2disease": "s2d", "sentiment": "sentiment", "sst2": "sst2", "scitldr": "scitldr"}


# -- children: one process per measured run ---------------------------------------------------------


def child_finetune(config: str, out: str, task: str, overrides: list[str]) -> dict:
    """Train a recipe, record this process's peak memory, then score the result on the test split."""
    from slmkit.config import load_config
    from slmkit.evals.device import peak_rss_mib
    from slmkit.train.finetune import FinetuneConfig, run

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(FinetuneConfig, config, [*overrides, f"out={out}"])
    started = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - started
    peak = peak_rss_mib()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    tokens = sum(r["tokens"] - p["tokens"] for p, r in zip([{"tokens": 0}] + steps, steps))
    step_seconds = sum((r["tokens"] - p["tokens"]) / r["tok_per_s"] for p, r in zip([{"tokens": 0}] + steps, steps))
    weights = Path(out) / ("model.safetensors" if cfg.method == "full" else "adapter_model.safetensors")
    return {"method": cfg.method, "wall_s": wall, "peak_rss_mib": peak, "train_tokens": tokens,
            "train_tok_per_s": tokens / step_seconds, "steps": result.state.step, "stop": result.stop_reason,
            "best_step": result.state.best_step, "best_val_loss": result.state.best_val_loss,
            "trainable_params": _trainable(weights, cfg.method), "weights_mib": weights.stat().st_size / 2**20,
            "test": score(out, task, shots=0)}


def _trainable(weights: Path, method: str) -> int:
    """Parameters the run trained: every tensor of the adapter file (or of the whole model for full)."""
    import math

    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def score(model: str, task: str, shots: int) -> dict:
    """The task's test metrics for MODEL (an adapter is merged into its float base for speed)."""
    from slmkit.data.shared import shared_data_dir
    from slmkit.evals.lm import LocalLM
    from slmkit.evals.runner import run_task
    from slmkit.evals.tasks import make_task
    from slmkit.load import load

    loaded = load(model, dtype=torch.float32, merge=True)
    result = run_task(LocalLM(loaded.model, loaded.tokenizer), make_task(task, shared_data_dir() / "eval"), shots,
                      limit=EVAL_LIMIT.get(task), progress=False)
    return {"n": result.n, "seconds": result.seconds, **result.metrics,
            **{f"{k}_stderr": v for k, v in result.stderr.items()}}


def run_child(kind: str, *args: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    print("  $", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- baselines ------------------------------------------------------------------------------------


def tfidf_baseline(task: str) -> dict:
    """TF-IDF (uni+bigrams, sublinear tf) + logistic regression; C chosen on the validation split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from slmkit.data.tasks import task_data

    data = task_data(task)
    text = lambda rows: [e.messages[-2]["content"] for e in rows]  # noqa: E731
    gold = lambda rows: [e.label for e in rows]  # noqa: E731
    train = data.train[:10000] if task == "sst2" else data.train  # the same cap as the fine-tuning recipe
    best = None
    for c in (0.3, 1, 3, 10, 30, 100):
        clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=c, max_iter=3000))
        clf.fit(text(train), gold(train))
        val = float((clf.predict(text(data.val)) == gold(data.val)).mean())
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    return {"C": c, "val_acc": val, "acc": float((clf.predict(text(data.test)) == gold(data.test)).mean()),
            "n": len(data.test)}


def lead_baseline(task: str) -> dict:
    """The abstract's first sentence as the summary, ROUGE as the task scores it."""
    from slmkit.data.shared import shared_data_dir
    from slmkit.evals.runner import aggregate, first_docs
    from slmkit.evals.tasks import make_task

    t = make_task(task, shared_data_dir() / "eval")
    rows = first_docs(t, t.eval_docs().rows, EVAL_LIMIT.get(task))
    per_doc = [t.score(d, _first_sentence(d["example"].messages[-2]["content"])) for d in rows]
    metrics, _ = aggregate(per_doc)
    return {"n": len(rows), **metrics}


def _first_sentence(abstract: str) -> str:
    import re

    return re.split(r"(?<=[.!?])\s+", abstract.strip(), maxsplit=1)[0]


# -- LoRA training speed against peft + transformers ---------------------------------------------------


def speed_vs_peft(rounds: int = 5, steps: int = 4, precision: str = "fp32") -> dict:
    """The same S2D batches through slmkit's step (the loop's loss, fused AdamW) and peft's (full logits,
    torch AdamW): forward, fp32 cross-entropy on the answer tokens, backward, clipping, optimizer step."""
    import contextlib

    import peft
    import transformers

    from slmkit.adapters.lora import LoraConfig, add_lora, lora_layers
    from slmkit.data.loader import Layout
    from slmkit.data.sft import encode_all
    from slmkit.data.sft_batches import IGNORE, ExampleBatches
    from slmkit.data.tasks import task_data
    from slmkit.interop.hf import save_hf
    from slmkit.load import load
    from slmkit.train.adapt import frozen_linears_to_bf16
    from slmkit.train.losses import masked_lm_loss
    from slmkit.train.optim import build_optimizer

    loaded = load(BASE, dtype=torch.float32)
    hf_dir = RUNS / "base-hf"
    if not (hf_dir / "model.safetensors").is_file():
        save_hf(loaded.model, loaded.tokenizer, hf_dir)
    examples, _ = encode_all(task_data("symptom2disease").train, loaded.tokenizer, 257)
    batches = ExampleBatches(examples, 256, Layout(8, 1), seed=0)
    batch_list = [batches.batch(s, 0) for s in range(steps)]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    ours = loaded.model.train()
    names = add_lora(ours, LoraConfig(r=16, alpha=32, dropout=0.0), torch.Generator().manual_seed(0))
    if precision == "bf16":
        frozen_linears_to_bf16(ours)  # what `slm finetune` does under bf16 autocast
    our_params = [p for p in ours.parameters() if p.requires_grad]
    our_opt = build_optimizer(ours, 1e-4, 0.0, (0.9, 0.95), 1e-8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.copy_(layer.lora_A.weight)
    theirs.train()
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    their_opt = torch.optim.AdamW(their_params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def our_step(batch):
        with autocast():
            loss, _ = masked_lm_loss(ours, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(our_params, 1.0)
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    def their_step(batch):
        keep = batch["targets"] != IGNORE
        with autocast():
            logits = theirs(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), batch["targets"][keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(their_params, 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    runners = {"slmkit": our_step, "peft+transformers": their_step}
    for step in runners.values():
        step(batch_list[0])
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, step in runners.items():
            start = time.perf_counter()
            for batch in batch_list:
                step(batch)
            times[name].append(time.perf_counter() - start)
    positions = sum(b["input_ids"].numel() for b in batch_list)
    paired = statistics.median(p / s for p, s in zip(times["peft+transformers"], times["slmkit"]))
    return {"precision": precision, "rounds": rounds, "steps_per_round": steps, "positions_per_round": positions,
            "adapted_linears": len(names), "threads": torch.get_num_threads(),
            "tok_per_s": {n: positions / statistics.median(t) for n, t in times.items()},
            "ratio": statistics.median(times["peft+transformers"]) / statistics.median(times["slmkit"]),
            "ratio_paired": paired, "round_seconds": times}


# -- orchestration -----------------------------------------------------------------------------------


def part(name: str, mode: str, make) -> dict | None:
    """One measured part. mode: run (always measure), reuse (measure unless already measured) or
    assemble (never measure: the part if already measured, else None)."""
    path = PARTS / f"{name}.json"
    if mode != "run" and path.is_file():
        print(f"{name}: reusing {path}")
        return json.loads(path.read_text())
    if mode == "assemble":
        print(f"{name}: not measured (no {path})")
        return None
    print(f"{name}: running", flush=True)
    started = time.perf_counter()
    value = make()
    value["part_seconds"] = time.perf_counter() - started
    PARTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def measured(parts: dict) -> dict:
    """Leave out the parts that are not measured (never fill them in)."""
    return {k: v for k, v in parts.items() if v is not None}


def task_parts(task: str, methods: tuple[str, ...], mode: str, wanted: set[str]) -> dict:
    """Baselines and each method's run; a method outside `wanted` is never run, only assembled."""
    out = {"baselines": {}, "methods": {}}
    short = SHORT[task]
    if task in CLASSIFICATION:
        out["baselines"]["tfidf_lr"] = part(f"{short}-tfidf", mode, lambda: tfidf_baseline(task))
        for shots in (0, 5):
            out["baselines"][f"base_{shots}shot"] = part(f"{short}-base-{shots}shot", mode,
                                                         lambda s=shots: run_child("score", BASE, task, str(s)))
    else:
        out["baselines"]["lead_sentence"] = part(f"{short}-lead", mode, lambda: lead_baseline(task))
        out["baselines"]["base_0shot"] = part(f"{short}-base-0shot", mode, lambda: run_child("score", BASE, task, "0"))
    for method in methods:
        config = ROOT / "configs" / "finetune" / f"{task}-{method}.yaml"
        out["methods"][method] = part(f"{short}-{method}", mode if method in wanted else "assemble",
                                      lambda c=config, m=method: run_child(
                                          "finetune", str(c), str(RUNS / f"{short}-{m}"), task))
    return {group: measured(parts) for group, parts in out.items()}


def overfit_part(mode: str) -> dict | None:
    """S2D LoRA on 200 rows at a constant high learning rate, patience long enough to show the rise."""
    config = ROOT / "configs" / "finetune" / "symptom2disease-lora.yaml"
    out = RUNS / "s2d-overlong"
    result = part("overfit", mode, lambda: run_child(
        "finetune", str(config), str(out), "symptom2disease", "epochs=15", "data.max_train_rows=200",
        "train.schedule=constant", "train.lr=2e-3", "train.eval_every=10", "train.early_stopping_patience=12"))
    if result is None:
        return None
    from slmkit.train.plot import plot_run

    png = plot_run(out)
    shutil.copyfile(png, OUT.with_name("finetune-overfit.png"))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    result["val_curve"] = [(e["step"], round(e["val_loss"], 4)) for e in evals]
    return result


def preference_part(mode: str) -> dict | None:
    """DPO and ORPO, LoRA and full, on on-policy SciTLDR pairs against the SFT model they start from:
    bench/preference.py (each run in its own process; its judge is stated in its docstring)."""
    def make() -> dict:
        subprocess.run([sys.executable, str(ROOT / "bench" / "preference.py"), "--reuse"], check=True)
        return json.loads((ROOT / "bench" / "results" / "preference.json").read_text())
    return part("preference", mode, make)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="s2d,sentiment,sst2,scitldr,speed,overfit,preference")
    parser.add_argument("--reuse", action="store_true", help="reuse parts already measured (runs/bench-finetune/parts)")
    parser.add_argument("--methods", default="full,lora,dora,qlora",
                        help="fine-tuning methods to run (default: all); the others' measured parts are kept")
    parser.add_argument("--assemble", action="store_true",
                        help="run nothing: assemble bench/results/finetune.json from the measured parts")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_as_child(*args.child)))
        return
    only, wanted = set(args.only.split(",")), set(args.methods.split(","))
    mode = "assemble" if args.assemble else "reuse" if args.reuse else "run"
    doc = json.loads(OUT.read_text()) if OUT.is_file() and mode != "run" else {}
    doc.update({"benchmark": "finetune", "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized to fp32)",
                "machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M")})
    doc.setdefault("tasks", {})
    for task, methods in {**CLASSIFICATION, **GENERATION}.items():
        if SHORT[task] in only:
            doc["tasks"][task] = task_parts(task, methods, mode, wanted)
    if "speed" in only:
        speeds = {p: part(f"speed-{p}", mode, lambda p=p: run_child("speed", p)) for p in ("fp32", "bf16")}
        doc["lora_speed_vs_peft"] = list(measured(speeds).values())
    if "overfit" in only and (result := overfit_part(mode)) is not None:
        doc["overfit"] = result
    if "preference" in only and (result := preference_part(mode)) is not None:
        doc["preference"] = result
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print_tables(doc)
    print(f"wrote {OUT}")


def print_tables(doc: dict) -> None:
    for task, result in doc.get("tasks", {}).items():
        print(f"\n{task}")
        for name, b in result["baselines"].items():
            print(f"  {name:22s} " + "  ".join(f"{k}={v:.4f}" for k, v in b.items()
                                              if isinstance(v, float) and not k.endswith(("stderr", "seconds"))))
        for method, m in result["methods"].items():
            t = m["test"]
            quality = "  ".join(f"{k}={v:.4f}" for k, v in t.items() if isinstance(v, float)
                                and not k.endswith(("stderr", "seconds")))
            print(f"  {method:22s} {quality}  trainable={m['trainable_params']:,}  weights={m['weights_mib']:.1f}MiB  "
                  f"peak={m['peak_rss_mib']:.0f}MiB  {m['train_tok_per_s']:.0f} tok/s  wall={m['wall_s']:.0f}s")
    for s in doc.get("lora_speed_vs_peft", []):
        print(f"\nLoRA step ({s['precision']}): slmkit {s['tok_per_s']['slmkit']:.0f} tok/s, peft+transformers "
              f"{s['tok_per_s']['peft+transformers']:.0f} tok/s: {s['ratio']:.2f}x (paired {s['ratio_paired']:.2f}x)")
    if "preference" in doc:
        p = doc["preference"]
        print(f"\npreference tuning on {p['pairs']} on-policy SciTLDR pairs; win rate vs the SFT model on "
              f"{p['test_rows']} test abstracts (SFT ROUGE-L {p['sft_test_rougeL']:.4f}):")
        for r in p["runs"]:
            acc = r["val_reward_accuracy"]
            print(f"  {r['method']}-{r['adapter']:5s} win rate {r['win_rate_vs_sft']:.3f}  ROUGE-L {r['test_rougeL']:.4f}  "
                  f"val reward accuracy {acc if acc is not None else float('nan'):.2f}  {r['wall_s']:.0f} s  "
                  f"peak {r['peak_rss_mib']:.0f} MiB")
    if "overfit" in doc:
        o = doc["overfit"]
        print(f"\nover-long run: best validation loss {o['best_val_loss']:.4f} at step {o['best_step']}, "
              f"stopped at {o['steps']} ({o['stop']}); plot {OUT.with_name('finetune-overfit.png')}")


def run_as_child(kind: str, *rest: str) -> dict:
    """One measured run in this (fresh) process: finetune CONFIG OUT TASK [OVERRIDES], score MODEL TASK SHOTS,
    or speed PRECISION."""
    if kind == "finetune":
        return child_finetune(rest[0], rest[1], rest[2], list(rest[3:]))
    if kind == "score":
        return score(rest[0], rest[1], int(rest[2]))
    return speed_vs_peft(precision=rest[0])


if __name__ == "__main__":
    main()

"""Distillation against training from scratch, same student, same batches, same steps, one run.

    python bench/distill.py [--steps 300] [--sweep-steps 60] [--chunks 400]

A ~23M-parameter student with SmolLM2's tokenizer (configs/distill/tinystories-23m.yaml) trains on
the first `chunks` x 256 tokens of the shared TinyStories sample (a) from scratch with
cross-entropy (kd.alpha=0) and (b) with logit KD from the bundled SmolLM2-135M-Instruct through its
top-32 cache. Both see identical batches (the chunk order is a function of the seed and the step)
and start from identical weights. Perplexity is measured on the validation split, which neither
student trained on. A shorter sweep then varies temperature and alpha. Writes
bench/results/distill.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit.config import load_config  # noqa: E402
from slmkit.data.loader import TokenStream, validation_batches  # noqa: E402
from slmkit.train.distill import DistillConfig, load_teacher, run  # noqa: E402
from slmkit.train.loop import evaluate  # noqa: E402

RECIPE = ROOT / "configs" / "distill" / "tinystories-23m.yaml"
SWEEP = [(1.0, 0.5), (2.0, 0.5), (1.0, 1.0), (2.0, 1.0)]  # (temperature, alpha)


def ensure_data(data: Path) -> None:
    if (data / "meta.json").is_file():
        return
    from slmkit.data.prepare import PrepareConfig, prepare

    corpus = ROOT.parent / "shared" / "data" / "corpus" / "tinystories"
    prepare(PrepareConfig(inputs=[str(corpus)], out=str(data)))


def train_once(name: str, overrides: list[str], runs: Path) -> dict:
    out = runs / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(DistillConfig, RECIPE, overrides + [f"out={out}"])
    started = time.perf_counter()
    result = run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    final = evals[-1]["val_loss"]
    return {"name": name, "overrides": overrides, "steps": result.state.step, "tokens": result.state.tokens,
            "seconds": round(time.perf_counter() - started, 1), "val_loss": final, "val_ppl": math.exp(final),
            "curve": [(r["step"], round(r["val_loss"], 4)) for r in evals]}


def teacher_perplexity(cfg: DistillConfig) -> float:
    teacher, _ = load_teacher(cfg, torch.device("cpu"))
    t = cfg.train
    batches = validation_batches(TokenStream(cfg.data, "val"), t.seq_len, t.micro_batch_size, t.eval_tokens)
    return math.exp(evaluate(teacher, teacher, batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the main pair (batch 8 x 256)")
    parser.add_argument("--sweep-steps", type=int, default=60, help="steps of each sweep run (batch 4 x 256)")
    parser.add_argument("--chunks", type=int, default=400, help="256-token training chunks (teacher cache size)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens per evaluation")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-distill"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = load_config(DistillConfig, RECIPE)
    ensure_data(Path(cfg.data))
    runs = Path(args.runs)
    common = [f"max_train_tokens={args.chunks * 256}", f"train.eval_tokens={args.eval_tokens}",
              "train.checkpoint_every=0"]
    main_run = common + [f"train.steps={args.steps}", f"train.eval_every={max(args.steps // 3, 1)}",
                         f"train.warmup_steps={max(args.steps // 10, 1)}"]
    results = {"scratch": train_once("scratch", main_run + ["kd.alpha=0"], runs),
               "kd": train_once("kd", main_run, runs)}
    sweep_run = common + [f"train.steps={args.sweep_steps}", "train.micro_batch_size=4",
                          f"train.eval_every={args.sweep_steps}", f"train.warmup_steps={max(args.sweep_steps // 10, 1)}"]
    sweep = [train_once("sweep-scratch", sweep_run + ["kd.alpha=0"], runs)]
    for temperature, alpha in SWEEP:
        sweep.append(train_once(f"sweep-T{temperature:g}-a{alpha:g}", sweep_run + [f"kd.temperature={temperature}",
                                                                                   f"kd.alpha={alpha}"], runs))
    teacher_ppl = teacher_perplexity(load_config(DistillConfig, RECIPE, [f"train.eval_tokens={args.eval_tokens}"]))
    gain = 1 - results["kd"]["val_ppl"] / results["scratch"]["val_ppl"]
    report = {"bench": "distill", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "recipe": str(RECIPE.relative_to(ROOT)), "chunks": args.chunks, "teacher_val_ppl": teacher_ppl,
              "main": results, "kd_ppl_reduction": gain, "sweep": sweep,
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distillation vs from scratch (validation perplexity; teacher {report['teacher_val_ppl']:.2f})")
    for column in ("run", "steps", "tokens", "val ppl", "minutes"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for row in [*report["main"].values(), *report["sweep"]]:
        table.add_row(row["name"], str(row["steps"]), f"{row['tokens']:,}", f"{row['val_ppl']:.2f}",
                      f"{row['seconds'] / 60:.1f}")
    Console().print(table)
    print(f"KD lowers validation perplexity by {100 * report['kd_ppl_reduction']:.1f}% (target >= 10%)")


if __name__ == "__main__":
    main()

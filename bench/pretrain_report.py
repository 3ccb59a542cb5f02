"""Summarise a pretraining run for the record: validation curve, time, tokens and fixed-seed samples.

    python bench/pretrain_report.py runs/tinystories-10m [--prompt "Once upon a time"] [--samples 3]

Writes bench/results/pretrain-<run name>.json and prints the samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams
from slmkit.load import load
from slmkit.train.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=90)
    args = parser.parse_args()
    run = Path(args.run)
    train, evals = read_metrics(run)
    trainer = json.loads(((run / "last").resolve() / "trainer.json").read_text())["state"]
    loaded = load(str(run / "best"), dtype=torch.float32)
    gen = TextGenerator(loaded.model, loaded.tokenizer)
    samples = []
    for seed in range(1, args.samples + 1):
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.7, top_p=0.9, seed=seed)
        samples.append(args.prompt + gen.complete([args.prompt], params)[0].text)
    report = {
        "run": run.name, "date": time.strftime("%Y-%m-%d %H:%M"),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "steps": trainer["step"], "tokens": trainer["tokens"], "training_seconds": trainer["elapsed_seconds"],
        "best_val_loss": trainer["best_val_loss"], "best_step": trainer["best_step"],
        "final_train_loss_mean_last_50": sum(r["loss"] for r in train[-50:]) / len(train[-50:]),
        "eval_curve": [{"step": e["step"], "val_loss": e["val_loss"]} for e in evals],
        "sampling": "temperature 0.7, top-p 0.9, seeds 1..n", "samples": samples,
    }
    out = ROOT / "bench" / "results" / f"pretrain-{run.name}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for s in samples:
        print(s, "\n---")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

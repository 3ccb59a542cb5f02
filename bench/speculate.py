"""Speculative decoding on SmolLM2-135M-Instruct: SciTLDR summaries, greedy, batch 1, plain decoding
against prompt lookup (and a draft model when one is given), interleaved in one run.

    python bench/speculate.py [--prompts 12] [--max-tokens 128] [--draft-tokens 4] [--draft MODEL] [--dtype float32]

Each SciTLDR test abstract is asked for a summary through the chat template. Every configuration
decodes the same prompts in turn (plain, lookup, draft, then the next prompt), so machine drift
hits them alike; speed = generated tokens / decode seconds over all prompts, and the speculative
texts must equal the plain ones (greedy). fp32 by default: there a (k+1)-position pass rounds like
k+1 one-position passes; in bf16 a near-tie can flip (see slmkit.infer.speculate).
Writes bench/results/speculate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from decode import cpu_name  # noqa: E402

from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.evals.api import save_results  # noqa: E402
from slmkit.generate import TextGenerator  # noqa: E402
from slmkit.infer.engine import Engine  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.infer.speculate import DraftModel, PromptLookup  # noqa: E402
from slmkit.load import load  # noqa: E402
from slmkit.tokenizer import same_vocabulary  # noqa: E402


def abstracts(count: int) -> list[str]:
    data = shared_data_dir()
    if data is None:
        sys.exit("the shared data directory (../shared/data) is needed for the prompts")
    rows = [json.loads(line) for line in (data / "tasks" / "scitldr" / "test.jsonl").read_text().splitlines()]
    return [" ".join(r["source"]) for r in rows if len(" ".join(r["source"])) < 1600][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--draft", default=None, help="a draft model with SmolLM2's tokenizer (optional row)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "speculate.json"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    loaded = load("smollm2-135m-instruct", dtype=dtype)
    configs = {"plain": None, "prompt lookup": PromptLookup()}
    if args.draft:
        draft = load(args.draft, dtype=dtype, merge=True)
        if not same_vocabulary(draft.tokenizer, loaded.tokenizer):
            sys.exit(f"{args.draft} has another tokenizer than SmolLM2; a draft must share it")
        configs[f"draft {Path(args.draft).name}"] = DraftModel(Engine(draft.model))
    gens = {name: TextGenerator(loaded.model, loaded.tokenizer, drafter=d, draft_tokens=args.draft_tokens)
            for name, d in configs.items()}
    params = SamplingParams(max_new_tokens=args.max_tokens)
    totals = {name: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "same_text": 0} for name in gens}
    for gen in gens.values():  # warm-up
        gen.chat([{"role": "user", "content": "Hello."}], SamplingParams(max_new_tokens=8))
    for i, text in enumerate(abstracts(args.prompts)):
        messages = [{"role": "user", "content": f"Summarize this abstract in one sentence.\n\n{text}"}]
        plain_text = None
        for name, gen in gens.items():
            out = gen.chat(messages, params)
            g, t = out.generation, totals[name]
            t["tokens"] += max(len(g.tokens) - 1, 0)
            t["seconds"] += g.decode_seconds
            t["drafted"] += g.drafted
            t["accepted"] += g.accepted
            plain_text = out.text if plain_text is None else plain_text
            t["same_text"] += out.text == plain_text
        print(f"{i + 1}/{args.prompts} " + "  ".join(f"{n}: {t['tokens'] / t['seconds']:.1f} tok/s"
                                                     for n, t in totals.items()), flush=True)
    base = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    rows = []
    for name, t in totals.items():
        tps = t["tokens"] / t["seconds"]
        rows.append({"config": name, "decode_tps": tps, "speedup": tps / base, "same_text": t["same_text"],
                     "acceptance": t["accepted"] / t["drafted"] if t["drafted"] else None,
                     "drafted": t["drafted"], "accepted": t["accepted"], "tokens": t["tokens"]})
    doc = {"benchmark": "speculative decoding", "model": "SmolLM2-135M-Instruct", "engine": f"torch {args.dtype}",
           "task": "SciTLDR test summaries, greedy", "prompts": args.prompts, "max_tokens": args.max_tokens,
           "draft_tokens": args.draft_tokens, "threads": torch.get_num_threads(), "machine": cpu_name(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "results": rows}
    save_results(doc, args.out)
    print(f"\n{'config':28s} {'tok/s':>7s} {'speed-up':>9s} {'accepted':>9s} {'same text':>10s}")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(f"{r['config']:28s} {r['decode_tps']:7.1f} {r['speedup']:8.2f}x {acc:>9s} "
              f"{r['same_text']:>4d}/{args.prompts}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

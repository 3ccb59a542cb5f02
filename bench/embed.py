"""Embedding benchmark: retrieval on shared data and throughput, SmolLM2-135M-Instruct (torch, fp32).

    python bench/embed.py [--pairs 100] [--batch-size 32]

Retrieval: the first --pairs SciTLDR test abstracts and their first reference TLDR; each TLDR
ranks every abstract by cosine similarity of `slmkit.infer.embed` vectors; recall@1/@5 is the
share whose own abstract ranks first / in the top 5 (chance: 1/pairs, 5/pairs). Throughput: texts
and tokens per second over all those texts. Writes bench/results/embed.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402

from slmkit.data.tasks import task_data  # noqa: E402
from slmkit.infer.embed import Embedder  # noqa: E402
from slmkit.load import load  # noqa: E402

OUT = ROOT / "bench" / "results" / "embed.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    rows = task_data("scitldr").test[: args.pairs]
    abstracts = [e.messages[-2]["content"] for e in rows]
    tldrs = [e.references[0] for e in rows]
    loaded = load("smollm2-135m-instruct", dtype=torch.float32)
    embedder = Embedder(loaded.model, loaded.tokenizer, args.batch_size)
    started = time.perf_counter()
    docs, queries = embedder.embed(abstracts), embedder.embed(tldrs)
    seconds = time.perf_counter() - started
    similarity = queries.vectors @ docs.vectors.T  # (queries, abstracts)
    rank = (similarity > similarity.diagonal()[:, None]).sum(1)  # abstracts scored above the right one
    doc = {"benchmark": "embed", "model": "SmolLM2-135M-Instruct (fp32, torch)", "machine": cpu_name(),
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "pairs": args.pairs,
           "recall_at_1": (rank < 1).float().mean().item(), "recall_at_5": (rank < 5).float().mean().item(),
           "chance_at_1": 1 / args.pairs, "chance_at_5": 5 / args.pairs, "texts": 2 * args.pairs,
           "tokens": sum(docs.tokens) + sum(queries.tokens), "seconds": seconds,
           "texts_per_s": 2 * args.pairs / seconds, "tokens_per_s": (sum(docs.tokens) + sum(queries.tokens)) / seconds}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"SciTLDR TLDR -> abstract retrieval over {args.pairs} abstracts: recall@1 {doc['recall_at_1']:.2f} "
          f"(chance {doc['chance_at_1']:.2f}), recall@5 {doc['recall_at_5']:.2f} (chance {doc['chance_at_5']:.2f})")
    print(f"throughput: {doc['texts_per_s']:.1f} texts/s, {doc['tokens_per_s']:.0f} tokens/s "
          f"(batch {args.batch_size}, {doc['threads']} threads)")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Embedding benchmark: retrieval on shared data, and throughput and parity on both engines,
SmolLM2-135M-Instruct.

    .venv/bin/python bench/embed.py [--pairs 100] [--texts 1000] [--batch-size 32] [--engines torch,llamacpp]

Retrieval: the first --pairs SciTLDR test abstracts and their first reference TLDR; each TLDR
ranks every abstract by cosine similarity of `slmkit.infer.embed` vectors (torch, fp32); recall@1/@5
is the share whose own abstract ranks first / in the top 5 (chance: 1/pairs, 5/pairs).
Throughput: --texts SST-2 training sentences embedded --batch-size at a time on each engine (torch:
slmkit's model in fp32; llamacpp: llama.cpp's embeddings mode on an f32 GGUF of the same weights, and
on the q8_0 export `slm serve` runs), in texts and tokens per second; every vector is compared with a
direct fp32 forward pass of its text alone (target: within 1e-4 for the fp32 engines).
Writes bench/results/embed.json and prints it.
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

from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.data.tasks import task_data  # noqa: E402
from slmkit.infer.embed import Embedder  # noqa: E402
from slmkit.infer.llamacpp import LlamaCppEmbedder, LlamaCppEngine  # noqa: E402
from slmkit.interop.gguf import write_gguf  # noqa: E402
from slmkit.load import load  # noqa: E402

OUT = ROOT / "bench" / "results" / "embed.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--engines", default="torch,llamacpp")
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
    doc["throughput"] = throughput(loaded, args.texts, args.batch_size, args.engines.split(","))
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"SciTLDR TLDR -> abstract retrieval over {args.pairs} abstracts: recall@1 {doc['recall_at_1']:.2f} "
          f"(chance {doc['chance_at_1']:.2f}), recall@5 {doc['recall_at_5']:.2f} (chance {doc['chance_at_5']:.2f})")
    print(f"throughput: {doc['texts_per_s']:.1f} texts/s, {doc['tokens_per_s']:.0f} tokens/s "
          f"(batch {args.batch_size}, {doc['threads']} threads)")
    print(f"\n{'engine':<16}{'texts/s':>9}{'tokens/s':>10}{'max |diff| vs direct fp32':>28}")
    for name, r in doc["throughput"].items():
        print(f"{name:<16}{r['texts_per_s']:>9.1f}{r['tokens_per_s']:>10.0f}{r['max_abs_diff_vs_direct']:>28.2e}")
    print(f"wrote {OUT}")


def throughput(loaded, count: int, batch_size: int, engines: list[str]) -> dict:
    """Texts/s and tokens/s of each engine on `count` short texts, and each vector's largest difference
    from a direct fp32 forward pass of its text alone."""
    lines = (shared_data_dir() / "tasks" / "sst2" / "train.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0].strip() for line in lines if line.split("\t")[0].strip()][:count]
    reference = Embedder(loaded.model, loaded.tokenizer, batch_size=1)
    direct = torch.cat([reference.embed([t]).vectors for t in texts])  # one text per forward pass
    embedders = {}
    if "torch" in engines:
        embedders["torch fp32"] = lambda: Embedder(loaded.model, loaded.tokenizer, batch_size)
    if "llamacpp" in engines:
        folder = ROOT / "runs" / "bench-embed"
        folder.mkdir(parents=True, exist_ok=True)
        for kind in ("f32", "q8_0"):
            gguf = folder / f"smollm2-{kind}.gguf"
            if not gguf.is_file():
                write_gguf(loaded.model, loaded.tokenizer, gguf, kind)
            engine = LlamaCppEngine(gguf, loaded.model.config, max_seq_len=512)
            embedders[f"llama.cpp {kind}"] = lambda e=engine: LlamaCppEmbedder(e, loaded.tokenizer, batch_size)
    out = {}
    for name, make in embedders.items():
        embedder = make()
        embedder.embed(texts[:batch_size])  # warm-up
        started = time.perf_counter()
        result = embedder.embed(texts)
        seconds = time.perf_counter() - started
        out[name] = {"texts": len(texts), "tokens": sum(result.tokens), "seconds": seconds,
                     "texts_per_s": len(texts) / seconds, "tokens_per_s": sum(result.tokens) / seconds,
                     "max_abs_diff_vs_direct": (result.vectors - direct).abs().max().item()}
    return out


if __name__ == "__main__":
    main()

"""Training throughput: slmkit against transformers' LlamaForCausalLM, identical config and batch, one run.

Both sides train the same architecture (the tinystories-10m recipe's model) from the same weights
on the same token batches, with the same thread count: forward, fp32 cross-entropy, backward,
gradient clipping and an AdamW step. transformers runs as its users run it (eager, `labels=` loss,
torch's default AdamW); slmkit runs its training loop's step (fused AdamW), eager and compiled.
Rounds are interleaved and medians reported; the ratio to transformers in the same run is the
result (also as the median of per-round ratios, which cancels slow drifts of this noisy machine). Achieved FLOP/s (counted with torch's FlopCounterMode) is compared with a matmul peak
measured here, now.

    python bench/train.py [--rounds 3] [--steps 4] [--precisions fp32,bf16] [--no-compile]

Writes bench/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402

from slmkit.config import ModelConfig, from_dict  # noqa: E402
from slmkit.model import CausalLM  # noqa: E402
from slmkit.train.loop import TrainConfig  # noqa: E402
from slmkit.train.losses import cross_entropy  # noqa: E402
from slmkit.train.optim import build_optimizer  # noqa: E402

RECIPE = ROOT / "configs" / "pretrain" / "tinystories-10m.yaml"


def model_config(vocab: int) -> ModelConfig:
    spec = yaml.safe_load(RECIPE.read_text())["model"]
    spec.update(vocab_size=vocab, hidden_dropout=0.0, attention_dropout=0.0)  # dropout off: same math both sides
    return from_dict(ModelConfig, spec)


def hf_twin(config: ModelConfig):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf_config)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def slmkit_step(model, forward, precision: str):
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)

    def step(batch):
        with autocast(precision):
            loss = cross_entropy(forward(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def transformers_step(model, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch):
        with autocast(precision):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def matmul_peak() -> float:
    """Best FLOP/s over a few large square and model-shaped fp32 GEMMs."""
    best = 0.0
    for n, k, m in ((2048, 2048, 2048), (4096, 320, 864), (4096, 864, 320), (1536, 1536, 1536)):
        a, b = torch.randn(n, k), torch.randn(k, m)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 2 * n * k * m * 5 / (time.perf_counter() - start))
    return best


def step_flops(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = parser.parse_args()

    config = model_config(args.vocab)
    torch.manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1)) for _ in range(args.steps)]
    reference = CausalLM(config)
    reference.init_weights(torch.Generator().manual_seed(0))
    flops = step_flops(reference, batches[0])

    runners = {}
    for precision in args.precisions.split(","):
        hf = hf_twin(config)
        hf.load_state_dict(reference.state_dict(), strict=False)
        runners[f"transformers {precision}"] = transformers_step(hf, precision)
        ours = CausalLM(config)
        ours.load_state_dict(reference.state_dict())
        runners[f"slmkit {precision}"] = slmkit_step(ours, ours, precision)
        if not args.no_compile and precision == "fp32":
            compiled = CausalLM(config)
            compiled.load_state_dict(reference.state_dict())
            mode = TrainConfig().compile_mode  # what `train.compile: true` uses
            runners[f"slmkit {precision} compiled"] = slmkit_step(compiled, torch.compile(compiled, mode=mode),
                                                                  precision)
    for name, step in runners.items():  # warm-up and compilation, excluded
        print(f"warming up {name}", flush=True)
        step(batches[0])
        step(batches[0])

    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, step in runners.items():
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            times[name].append((time.perf_counter() - start) / len(batches))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    peak = matmul_peak()
    tokens = args.batch * args.seq_len
    rows = []
    for name, runs in times.items():
        seconds = statistics.median(runs)
        precision = name.split()[1]
        ref_runs = times[f"transformers {precision}"]
        paired = statistics.median(r / t for r, t in zip(ref_runs, runs))  # same round: same machine state
        rows.append({"engine": name, "tokens_per_s": tokens / seconds, "step_seconds": seconds,
                     "vs_transformers": statistics.median(ref_runs) / seconds, "vs_transformers_paired": paired,
                     "flops_per_s": flops / seconds,
                     "fraction_of_matmul_peak": flops / seconds / peak,
                     "tokens_per_s_runs": [round(tokens / t, 1) for t in runs]})
    result = {"benchmark": "train", "model": "tinystories-10m recipe architecture",
              "parameters": sum(p.numel() for p in reference.parameters()), "batch": args.batch,
              "seq_len": args.seq_len, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "flops_per_step": flops,
              "matmul_peak_flops_per_s": peak, "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmatmul peak measured now: {peak / 1e9:.1f} GFLOP/s; {flops / 1e9:.1f} GFLOP per step")
    print(f"{'engine':26s} {'tokens/s':>9s} {'x transformers':>15s} {'(paired)':>9s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        print(f"{r['engine']:26s} {r['tokens_per_s']:9.0f} {r['vs_transformers']:14.2f}x "
              f"{r['vs_transformers_paired']:8.2f}x {r['flops_per_s'] / 1e9:8.1f} {r['fraction_of_matmul_peak']:8.0%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

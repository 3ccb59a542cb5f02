"""Peak resident memory of loading a quantized SmolLM2-135M checkpoint, and where it comes from.

    python bench/load_memory.py [--runs 3]

int8 (per-row) and int4 (RTN, group 64) checkpoints of the bundled model are written once under
runs/bench-load-memory/; each is then loaded by `runs` fresh processes that also generate 16
tokens (bench/quantize.py's `peak_memory_mib`), and the median VmHWM is kept. The weights' own
size is printed beside it: a loader without float temporaries of the whole model peaks at about
the weights plus PyTorch's own ~220 MiB. Writes bench/results/load_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize import peak_memory_mib, weights_bytes  # noqa: E402

from slmkit.compress.quant.quantize import QuantConfig, quantize_model  # noqa: E402
from slmkit.interop.hf import save_checkpoint  # noqa: E402
from slmkit.load import load  # noqa: E402

VARIANTS = {"int8": QuantConfig(method="int8"), "int4-g64": QuantConfig(method="int4", group_size=64)}


def checkpoint(name: str, config: QuantConfig, runs: Path) -> Path:
    path = runs / name
    if not (path / "model.safetensors").is_file():
        loaded = load()
        quantize_model(loaded.model, config, progress=False)
        save_checkpoint(loaded.model, loaded.tokenizer, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per checkpoint (median kept)")
    parser.add_argument("--dir", default=str(ROOT / "runs" / "bench-load-memory"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_memory.json"))
    args = parser.parse_args()
    rows = {}
    for name, config in VARIANTS.items():
        path = checkpoint(name, config, Path(args.dir))
        peaks = [peak_memory_mib(path, "float32") for _ in range(args.runs)]
        rows[name] = {"weights_mib": weights_bytes(path) / 2**20, "peak_mib": statistics.median(peaks),
                      "peaks_mib": peaks}
    report = {"bench": "load_memory", "torch": torch.__version__, "rows": rows,
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'checkpoint':<10} {'weights MiB':>12} {'peak RSS MiB (median)':>22}  runs")
    for name, row in rows.items():
        print(f"{name:<10} {row['weights_mib']:>12.1f} {row['peak_mib']:>22.1f}  "
              + ", ".join(f"{p:.0f}" for p in row["peaks_mib"]))


if __name__ == "__main__":
    main()

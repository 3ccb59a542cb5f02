"""Structured output on SmolLM2-135M-Instruct: how often the answer parses and validates, and what
the grammar mask costs in decode speed, against the same prompts decoded freely in the same run.

    python bench/structured.py [--prompts 50] [--max-tokens 160] [--dtype bfloat16]
                               [--engine torch|llamacpp] [--gguf-type q8_0]

Fifty varied prompts from the shared task data: SST-2 sentences and Symptom2Disease descriptions
under a JSON Schema each (enums, arrays, booleans, required fields, no extra properties) and
Self-Instruct instructions in JSON-object mode. Every prompt is decoded greedily twice, with and
without the format (in alternating order, so drift on a noisy machine hits both alike). An answer
counts as valid only when it ended by itself and `jsonschema` accepts it: one cut off by the token
budget counts as a failure. Speed = generated tokens / decode seconds over all prompts.
Engine: the PyTorch engine at --dtype, or llama.cpp on a --gguf-type export of the same weights (the
grammar mask is slmkit's on both). Writes bench/results/structured.json (torch) or
structured-llamacpp.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import jsonschema  # noqa: E402
import torch  # noqa: E402
from decode import cpu_name  # noqa: E402

from slmkit.data.shared import shared_data_dir  # noqa: E402
from slmkit.evals.api import save_results  # noqa: E402
from slmkit.generate import TextGenerator  # noqa: E402
from slmkit.infer.constrain import OutputFormat  # noqa: E402
from slmkit.infer.llamacpp import LlamaCppEngine, runtime_files  # noqa: E402
from slmkit.infer.sampling import SamplingParams  # noqa: E402
from slmkit.interop.hf import save_hf  # noqa: E402
from slmkit.load import load  # noqa: E402

SENTIMENT = {"type": "object", "additionalProperties": False, "required": ["sentiment", "keywords"],
             "properties": {"sentiment": {"enum": ["positive", "negative"]},
                            "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
TRIAGE = {"type": "object", "additionalProperties": False, "required": ["symptoms", "body_parts", "see_doctor"],
          "properties": {"symptoms": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                         "body_parts": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                         "see_doctor": {"type": "boolean"}}}


def cases(count: int) -> list[tuple[str, OutputFormat, dict]]:
    """(user message, format, schema to validate against), a third from each source."""
    data = shared_data_dir()
    if data is None:
        sys.exit("the shared data directory (../shared/data) is needed for the prompts")
    tasks = data / "tasks"
    sst = [line.split("\t")[0].strip() for line in (tasks / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    with open(tasks / "symptom2disease" / "Symptom2Disease.csv", newline="") as f:
        symptoms = [row["text"] for row in csv.DictReader(f)]
    instructions = [json.loads(line)["instruction"] for line in
                    (tasks / "self_instruct_human" / "user_oriented_instructions.jsonl").read_text().splitlines()]
    third = -(-count // 3)
    out = [(f"Give the sentiment of this movie review and up to three keywords, as JSON.\nReview: {s}",
            OutputFormat("json_schema", schema=SENTIMENT), SENTIMENT) for s in sst[:third]]
    out += [(f"List the symptoms and body parts in this patient note and say if they should see a doctor, as "
             f"JSON.\nNote: {s}", OutputFormat("json_schema", schema=TRIAGE), TRIAGE) for s in symptoms[::37][:third]]
    out += [(f"{s}\nAnswer with a JSON object.", OutputFormat("json_object"), {"type": "object"})
            for s in instructions[::5][:count - len(out)]]
    return out[:count]


def run_case(gen: TextGenerator, message: str, fmt: OutputFormat | None, max_tokens: int):
    return gen.chat([{"role": "user", "content": message}], SamplingParams(max_new_tokens=max_tokens),
                    output_format=fmt)


def valid(completion, schema: dict) -> bool:
    if completion.finish_reason != "stop":
        return False
    try:
        jsonschema.validate(json.loads(completion.text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def generator(args) -> tuple[TextGenerator, str]:
    if args.engine == "llamacpp":  # the bundled model's weights, exported to --gguf-type like `slm` does
        source = runs_copy()
        files = runtime_files(str(source), args.gguf_type)
        return TextGenerator(None, files.tokenizer, engine=LlamaCppEngine.for_files(files)), f"llamacpp {args.gguf_type}"
    loaded = load("smollm2-135m-instruct", dtype=getattr(torch, args.dtype))
    return TextGenerator(loaded.model, loaded.tokenizer), f"torch {args.dtype}"


def runs_copy() -> Path:
    """The bundled model as an HF directory (what `slm` exports for llama.cpp; the bundled GGUF itself
    is Q4_1 and would run as it is)."""
    path = ROOT / "runs" / "bench-structured" / "smollm2-hf"
    if not (path / "model.safetensors").is_file():
        loaded = load("smollm2-135m-instruct")
        save_hf(loaded.model, loaded.tokenizer, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--engine", choices=("torch", "llamacpp"), default="torch")
    parser.add_argument("--gguf-type", default="q8_0", help="llamacpp: the export's GGUF type")
    parser.add_argument("--out", default=None, help="default: bench/results/structured[-llamacpp].json")
    args = parser.parse_args()
    suffix = "" if args.engine == "torch" else "-llamacpp"
    args.out = args.out or str(ROOT / "bench" / "results" / f"structured{suffix}.json")
    gen, engine_name = generator(args)
    run_case(gen, "Warm up.", OutputFormat("json_object"), 8)
    rows, speed = [], {"constrained": [0, 0.0], "free": [0, 0.0]}  # [decode steps, seconds]
    for i, (message, fmt, schema) in enumerate(cases(args.prompts)):
        order = [("constrained", fmt), ("free", None)][:: 1 if i % 2 == 0 else -1]
        got = {name: run_case(gen, message, f, args.max_tokens) for name, f in order}
        for name, completion in got.items():
            g = completion.generation
            speed[name][0] += max(len(g.tokens) - 1, 0)
            speed[name][1] += g.decode_seconds
        rows.append({"kind": fmt.kind, "finish": got["constrained"].finish_reason,
                     "valid": valid(got["constrained"], schema), "free_valid": valid(got["free"], schema),
                     "tokens": len(got["constrained"].tokens), "text": got["constrained"].text})
        print(f"{i + 1:3d}/{args.prompts} {fmt.kind:12s} valid={rows[-1]['valid']!s:5s} "
              f"free={rows[-1]['free_valid']!s:5s} {got['constrained'].text[:70]!r}", flush=True)
    tps = {name: steps / seconds for name, (steps, seconds) in speed.items()}
    summary = {kind: {"prompts": sum(r["kind"] == kind for r in rows),
                      "valid": sum(r["valid"] for r in rows if r["kind"] == kind),
                      "valid_without_format": sum(r["free_valid"] for r in rows if r["kind"] == kind)}
               for kind in ("json_schema", "json_object")}
    doc = {"benchmark": "structured output", "model": "SmolLM2-135M-Instruct", "engine": engine_name,
           "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "machine": cpu_name(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary,
           "valid_rate": sum(r["valid"] for r in rows) / len(rows),
           "decode_tps": tps, "decode_ratio": tps["constrained"] / tps["free"], "rows": rows}
    save_results(doc, args.out)
    print(f"\n{'format':12s} {'prompts':>8s} {'valid':>6s} {'valid w/o format':>17s}")
    for kind, s in summary.items():
        print(f"{kind:12s} {s['prompts']:8d} {s['valid']:6d} {s['valid_without_format']:17d}")
    print(f"decode: {tps['constrained']:.1f} tok/s constrained vs {tps['free']:.1f} free "
          f"({doc['decode_ratio']:.2f}x) -- wrote {args.out}")


if __name__ == "__main__":
    main()

"""`slm <verb>`: the command line. Each verb is a small function; heavy modules load lazily.

Errors meant for the user (`SlmError`) print as one line and exit with status 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slmkit.presets import DEFAULT_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slmkit never downloads models
DTYPES = ("bfloat16", "float32")
HELP_WANTED = False  # set by main(): build the (costly) config listings only for --help


def _port(value: str) -> int:
    """argparse type: a TCP port, refused in one line before the model loads (bind would overflow later)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a port number; give 1..65535 (e.g. 8000)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535; give a free port such as 8000")
    return port


def _add_model(p: argparse.ArgumentParser, optional: bool = False) -> None:
    help_text = (f"GGUF file, Hugging Face directory or preset name (`slm presets`); "
                 f"'{DEFAULT_MODEL}' is the bundled SmolLM2-135M-Instruct")
    if optional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=help_text + " (default)")
    else:
        p.add_argument("model", help=help_text)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="weight precision in memory (default bfloat16: half the memory traffic of float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--context", type=int, default=None,
                   help="maximum tokens in the context (default: the model's own limit)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (torch engine): ~1.5-2x faster decoding after 2-5 min of "
                        "compiling on first use (1-2 min on later starts, from inductor's cache)")
    p.add_argument("--speculate", metavar="lookup|draft=MODEL", default=None,
                   help="speculative decoding, same text: 'lookup' drafts by matching the prompt's n-grams (good "
                        "for summaries and extraction); 'draft=MODEL' drafts with a smaller model of the same "
                        "tokenizer (e.g. a distilled student)")
    p.add_argument("--draft-tokens", type=int, default=4, help="guesses verified per pass with --speculate")
    _add_engine(p, "; torch is the one for --compile and --speculate")


def _add_engine(p: argparse.ArgumentParser, torch_note: str = "", default: str = "auto") -> None:
    p.add_argument("--engine", choices=("auto", "torch", "llamacpp"), default=default,
                   help="runtime: llamacpp exports the model to GGUF once (cached) and decodes in llama.cpp, ~4x "
                        "faster on a CPU; torch is slmkit's PyTorch engine (the reference)" + torch_note +
                        "; auto: llamacpp when installed and the model exports to GGUF" +
                        ("" if default == "auto" else f" (default {default})"))
    p.add_argument("--gguf-type", choices=("q8_0", "q4_0", "q4_k_m", "f16"), default="q8_0",
                   help="GGUF type of the export the llamacpp engine runs (a GGUF MODEL runs as it is)")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 for variety")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_output_format(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (the text always parses; grammar by llguidance)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--json", action="store_true", help="answer with one JSON object")
    one.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                     help="answer with JSON valid under this JSON Schema (a .json file or the schema inline)")
    one.add_argument("--choices", metavar="A,B,...", default=None,
                     help="answer with exactly one of these comma-separated labels (classification)")


SERVE_EPILOG = """examples:
  slm serve                                    # the bundled model on http://127.0.0.1:8000 (chat page at /)
  slm serve small=runs/student/best big=smollm2-135m-instruct --api-key secret
  slm serve --route local=runs/student/best --route remote=http://127.0.0.1:8001/v1,model=smollm2-135m-instruct

Routing serves the model name 'auto': each request is answered by the local model unless the
policy escalates it to the remote one (any OpenAI-compatible URL; key=ENV_VAR names the variable
holding its API key). The answer's `slmkit_route` field and `x-slmkit-route` header say what happened.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm", description="slmkit: small language models on your CPU, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    _add_model(p)
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that is too long")
    _add_runtime(p)
    _add_sampling(p, 128)
    _add_output_format(p)

    p = sub.add_parser("chat", help="talk to a model (/reset, /system TEXT, /exit)")
    _add_model(p, optional=True)
    p.add_argument("--system", default=None, help="system message for the conversation")
    _add_runtime(p)
    _add_sampling(p, 512)

    p = sub.add_parser("info", help="model card: architecture, parameters, file and memory sizes")
    _add_model(p, optional=True)

    p = sub.add_parser("size", help="parameters, weight memory and KV-cache memory at a precision")
    _add_model(p)
    p.add_argument("--bits", type=int, default=16, help="bits per weight (4, 8, 16, 32)")
    p.add_argument("--group-size", type=int, default=32, help="weights per quantization scale (below 16 bits)")
    p.add_argument("--context", type=int, default=4096, help="tokens held in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache")
    p.add_argument("--kv-bits", type=int, default=16, help="bits per KV-cache value")

    sub.add_parser("presets", help="list the named architectures")

    p = sub.add_parser("convert", help="convert between GGUF and Hugging Face directories")
    p.add_argument("src", help="GGUF file, HF directory or preset with weights")
    p.add_argument("dst", help="OUT.gguf for GGUF, anything else for an HF directory")
    p.add_argument("--type", choices=("f32", "f16"), default="f16", help="GGUF tensor type for matrices")
    p.add_argument("--dtype", choices=DTYPES + ("float16",), default="float32",
                   help="safetensors precision for an HF directory")

    p = sub.add_parser("quantize", help="int8 / int4 (RTN, GPTQ, AWQ) weights on packed CPU kernels",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=QUANTIZE_EPILOG)
    _add_model(p)
    p.add_argument("-o", "--out", required=True, help="output directory (a quantized HF-style checkpoint)")
    p.add_argument("--method", choices=("int8", "int4", "gptq", "awq"), default="int4",
                   help="int8: per-row round-to-nearest; int4: group-wise round-to-nearest; gptq/awq: calibrated int4")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256),
                   help="int4 weights per scale and zero point (smaller: more accurate, larger file)")
    p.add_argument("--pad-groups", action="store_true",
                   help="allow layer widths that the group size does not divide (zero-pads each row's last group)")
    p.add_argument("--keep-lm-head", action="store_true", help="keep the output head in float")
    p.add_argument("--skip", action="append", default=[], help="linear name (or suffix) to keep in float; repeatable")
    p.add_argument("--calib", help="calibration text file or `slm prepare` directory (gptq/awq; default: the "
                                   "shared WikiText-2 valid text)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation energy")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")

    _add_prune(sub)
    _add_lowrank(sub)

    p = sub.add_parser("eval", help="benchmark tasks (lm-evaluation-harness formats) or a text's perplexity",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EPILOG)
    _add_model(p, optional=True)
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks (default: the suite hellaswag,arc_easy,arc_challenge,piqa,winogrande,"
                        "boolq,mmlu,gsm8k, under an hour for a 135M model); `--tasks list` shows them all")
    p.add_argument("--shots", default=None, help="few-shot examples, e.g. 0 or 0,5 (default: each task's own: "
                                                 "0, and 5 for gsm8k); several values report the gain")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N documents of each task (MMLU: of each subject); the default suite "
                        "uses its own limits (see README), other tasks default to all documents")
    p.add_argument("--full", action="store_true", help="the default suite on every document (hours, not minutes)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (results do not depend on it)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--data-dir", default=None, help="evaluation data folder (default: ../shared/data/eval)")
    p.add_argument("--perplexity", metavar="FILE", default=None,
                   help="instead of tasks: perplexity and bits per byte of a text file (sliding window)")
    p.add_argument("--stride", type=int, default=None, help="--perplexity: new tokens per window (default: half "
                                                          "the context)")
    p.add_argument("--endpoint", metavar="URL", default=None,
                   help="score the model served at this OpenAI-compatible URL instead (e.g. http://127.0.0.1:8000); "
                        "MODEL is then the served model's name; the key comes from $OPENAI_API_KEY")
    p.add_argument("-o", "--output", default=None, help="results JSON (default: runs/eval/<model>-<time>.json)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision in memory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    # torch by default: an evaluation measures the weights as they are, not a Q8_0 copy of them
    _add_engine(p, "; llamacpp scores the GGUF export (its --gguf-type rounding included), torch the weights as "
                   "they are, and is the one for --perplexity", default="torch")

    p = sub.add_parser("bench", help="on-device latency and memory: TTFT, prefill and decode tokens/s, peak memory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BENCH_EPILOG)
    p.add_argument("models", nargs="*", default=[DEFAULT_MODEL],
                   help="GGUF files, HF directories or preset names (presets run with random weights)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (never stops early)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch size after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision in memory")
    p.add_argument("--sweep", action="store_true",
                   help="also measure the presets smollm2-135m, openelm-270m, smollm2-360m, qwen2-0.5b, llama-3.2-1b "
                        "and plot decode speed against size")
    p.add_argument("-o", "--output", default=None, help="results JSON (default: runs/bench/bench-<time>.json)")
    _add_engine(p, " (--dtype applies to it)")

    p = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching, router, chat page at /)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG)
    p.add_argument("models", nargs="*", default=[], help=f"models to serve, each as [NAME=]MODEL (default: "
                   f"{DEFAULT_MODEL}); clients pick one by NAME in the `model` field")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0..65535; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(default: $SLMKIT_API_KEY if set)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests per model before 429")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all")
    p.add_argument("--route", action="append", default=[], metavar="SIDE=TARGET",
                   help="hybrid routing under the model name 'auto': local=MODEL and "
                        "remote=URL[,model=NAME,key=ENV_VAR] (see below)")
    p.add_argument("--policy", default="confidence", help="routing policy: confidence, length, keyword, "
                   "always-local, always-remote")
    p.add_argument("--threshold", type=float, default=-1.0,
                   help="confidence policy: escalate when the draft's mean token log-prob is below this")
    p.add_argument("--draft-tokens", type=int, default=32,
                   help="confidence policy: decide after this many draft tokens (0: the whole answer)")
    p.add_argument("--remote-timeout", type=float, default=60.0, help="seconds to wait for the remote model")
    # Batched decoding reads each weight once per step for the whole batch; on CPUs without bf16 units
    # the bf16 weights would be converted to fp32 at every multi-row step, which costs more than it saves.
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision in memory (float32: "
                   "fastest batched decoding on CPUs without bf16 units; bfloat16: half the memory)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--context", type=int, default=None,
                   help="maximum tokens per request, prompt included (default: the model's own limit; 2048 on "
                        "the llama.cpp engine, which reserves every sequence's cache up front)")
    _add_engine(p)

    p = sub.add_parser("route-eval", help="quality vs share escalated of the confidence router on a labelled set",
                       description="Score a local and a remote model on a multiple-choice task and report, for "
                       "each confidence threshold, the accuracy and share escalated a confidence router gets "
                       "(JSON and a PNG curve).")
    p.add_argument("--local", required=True, help="the local model (anything slmkit loads)")
    p.add_argument("--remote", required=True, help="the larger model: URL[,model=NAME,key=ENV_VAR] of an "
                   "OpenAI-compatible server, or a model slmkit loads")
    p.add_argument("--task", default="arc_easy", help="a multiple-choice task (slm eval's names)")
    p.add_argument("--limit", type=int, default=200, help="documents scored")
    p.add_argument("--thresholds", default="auto",
                   help="comma-separated mean-token-log-prob thresholds, or 'auto': the deciles of the local "
                        "model's confidences")
    p.add_argument("--data-dir", default=None, help="eval data folder (default: ../shared/data/eval)")
    p.add_argument("-o", "--out", default="runs/route-eval", help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("report", help="a markdown report and plots comparing variants from results JSON files")
    p.add_argument("results", nargs="+", help="JSON files or folders written by slm eval, slm bench or bench/quantize.py")
    p.add_argument("-o", "--out", default="runs/report", help="output folder (report.md and PNG plots)")

    p = sub.add_parser("export", help="write a model for other runtimes (GGUF for llama.cpp / ollama)")
    export_sub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    p = export_sub.add_parser("gguf", help="a llama-architecture GGUF file with the tokenizer and chat template")
    _add_model(p)
    p.add_argument("out", help="OUT.gguf")
    p.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m"), default="q8_0",
                   help="tensor type: q8_0 is near-lossless, q4_k_m is llama.cpp's popular 4-bit mix")
    p.add_argument("--densify", action="store_true",
                   help="a factorized model (`slm lowrank`): multiply its factors back into full matrices first "
                        "(llama.cpp has no factorized linears; same outputs, the original size)")

    p = export_sub.add_parser("gguf-lora", help="a LoRA adapter as a llama.cpp adapter file (--lora in llama.cpp)",
                              description="Write an adapter directory (PEFT format) as a llama.cpp LoRA GGUF. Run it "
                              "over a GGUF export of its base: llama-cli -m base.gguf --lora OUT.gguf")
    p.add_argument("adapter", help="adapter directory (e.g. runs/s2d-lora)")
    p.add_argument("out", help="OUT.gguf")
    p.add_argument("--base", default=None, help="the base MODEL (default: the one the adapter's config names)")

    p = sub.add_parser("merge", help="fold an adapter into its base's weights (a quantized base is requantized)",
                       description="Write BASE with ADAPTER folded into its weights: an HF directory (or a "
                       "quantized checkpoint when BASE is quantized: dequantize, merge, requantize, and report "
                       "the error that adds).")
    p.add_argument("base", help="the base MODEL the adapter was trained on")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES + ("float16",), default="float32", help="safetensors precision of a float base")

    p = sub.add_parser("prepare", help="filter, de-duplicate, split, tokenize and pack text into shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_help("PrepareConfig", "slmkit.data.prepare"))
    p.add_argument("items", nargs="*", metavar="INPUT|key=value",
                   help="files, globs or directories to read, and key=value settings (listed below)")
    p.add_argument("--config", help="YAML file with settings (key=value arguments override it)")
    p.add_argument("--tokenizer", help="tokenizer.json directory or model (default: the bundled SmolLM2)")
    p.add_argument("--out", help="output directory")

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = p.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer and report its compression")
    p.add_argument("inputs", nargs="+", help="files, globs or directories of text")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary")
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="documents held out to measure compression")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out split")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.csv/.parquet records")
    p.add_argument("--separator", default="auto", help="document separator in .txt files")

    _add_config_verb(sub, "pretrain", "train a model from scratch on prepared data", "PretrainConfig",
                     "slmkit.train.pretrain", "configs/pretrain/tinystories-10m.yaml", resumable=True)
    _add_config_verb(sub, "distill", "train a student from a teacher's outputs (logit, hidden-state KD)",
                     "DistillConfig", "slmkit.train.distill", "configs/distill/tinystories-23m.yaml", resumable=True)
    _add_config_verb(sub, "finetune", "adapt a model to a task or domain: full, LoRA, DoRA or QLoRA",
                     "FinetuneConfig", "slmkit.train.finetune", "configs/finetune/symptom2disease-lora.yaml",
                     resumable=True)
    _add_config_verb(sub, "synth", "have a teacher write a corpus from seed prompts (sequence-level KD)",
                     "SynthConfig", "slmkit.data.synth", "synth.yaml holding the settings below (or key=value alone: count=200)")

    p = sub.add_parser("plot", help="plot train/validation loss and learning rate of a run")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")

    p = sub.add_parser("demo", help="the guided tour on the bundled model")
    p.add_argument("--max-tokens", type=int, default=96, help="new tokens per answer")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return parser


EVAL_EPILOG = """examples:
  slm eval --tasks list
  slm eval smollm2-135m-instruct --tasks arc_easy,piqa --limit 200      # a quick look (~2 min)
  slm eval smollm2-135m-instruct                                         # the whole suite (see README)
  slm eval runs/smollm2-gptq --tasks mmlu --shots 0,5                    # the in-context-learning gain
  slm eval smollm2-135m-instruct --perplexity ../shared/data/corpus/wikitext2/valid.txt
  slm eval runs/s2d-lora --tasks symptom2disease        # a fine-tuned model on its task's test split
  slm eval runs/s2d-lora --tasks symptom2disease:val    # ... on the validation split, to choose settings

Prompt formats and metrics follow lm-evaluation-harness (each task's docstring quotes them);
results do not depend on --batch-size and are the same on every run.
"""

BENCH_EPILOG = """examples:
  slm bench                                                   # the bundled SmolLM2-135M
  slm bench smollm2-135m-instruct runs/smollm2-int8 --batch 1,8
  slm bench --sweep --prompt-tokens 128 --new-tokens 32       # how architecture changes latency here

Each model is measured in its own process (its own peak memory and load time); one warm-up run is
excluded and the median of --runs is reported with its min and max.
"""

QUANTIZE_EPILOG = """examples:
  slm quantize smollm2-135m-instruct --method int8 -o runs/smollm2-int8
  slm quantize smollm2-135m-instruct --method gptq --group-size 64 -o runs/smollm2-gptq
  slm generate runs/smollm2-gptq "Once upon a time"
  slm export gguf runs/smollm2-int8 smollm2-q8.gguf --type q8_0
"""


PRUNE_EPILOG = """\
Unstructured / N:M (zeros in place; same shape, same speed):
  magnitude   drop the smallest |W| in each row (the floor)
  wanda       drop the smallest |W| x ||X_j|| in each row (calibration activations, no update)
  sparsegpt   OBS saliency, and the remaining weights of each row updated to absorb the error
  Unstructured and 2:4 sparsity give NO CPU speed-up with PyTorch's dense kernels: use them for
  quality research or as a start for further compression. Speed comes from --structured.
  Fine-tuning and distillation of a pruned checkpoint keep its zeros at zero.

Structured (a smaller dense model of the same architecture; faster):
  --params 90M, or any of --ffn --heads --kv-heads --hidden --layers; importance from calibration
  activations (Minitron: MLP neurons, heads within GQA groups, hidden channels; layers by block
  influence, ShortGPT). Heal it with `slm distill` from the original: configs/distill/heal-*.yaml.

examples:
  slm prune smollm2-135m-instruct --method wanda --sparsity 0.5 -o runs/smollm2-wanda50
  slm prune smollm2-135m-instruct --method sparsegpt --pattern 2:4 -o runs/smollm2-sgpt24
  slm prune smollm2-135m-instruct --structured --params 95M -o runs/smollm2-95m
  slm distill --config configs/distill/heal-width.yaml
"""


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="remove weights: magnitude / Wanda / SparseGPT (sparse or N:M), or structured "
                       "width and depth pruning", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=PRUNE_EPILOG)
    _add_model(p)
    p.add_argument("-o", "--out", required=True, help="output directory (an HF-style checkpoint)")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda",
                   help="unstructured pruning method (default wanda)")
    p.add_argument("--sparsity", type=float, help="share of each row's weights to remove, in (0, 1)")
    p.add_argument("--pattern", help="N:M semi-structured sparsity: at most N non-zeros in every M (e.g. 2:4)")
    p.add_argument("--structured", action="store_true", help="remove whole neurons, heads, channels or layers")
    p.add_argument("--params", help="structured: target parameter count, e.g. 95M (the shape is chosen for you)")
    p.add_argument("--ffn", type=int, help="structured: MLP width to keep")
    p.add_argument("--heads", type=int, help="structured: query heads to keep (evenly within the KV groups)")
    p.add_argument("--kv-heads", type=int, help="structured: key/value heads (whole GQA groups) to keep")
    p.add_argument("--hidden", type=int, help="structured: hidden channels to keep")
    p.add_argument("--layers", type=int, help="structured: layers to keep")
    p.add_argument("--layer-metric", choices=("block_influence", "angular"), default="block_influence",
                   help="structured: which layers go (ShortGPT block influence, or the angular-distance run)")
    p.add_argument("--per-layer", action="store_true",
                   help="structured: let each layer keep its own widths (HF/GGUF export then refuse)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="structured: only slice; by default down_proj/o_proj are refit by least squares so the kept "
                        "neurons and heads reproduce each layer's output on the calibration text")
    p.add_argument("--calib", help="calibration text file or `slm prepare` directory (default: the start of the "
                                   "shared WikiText-2 valid text; evaluation reads its end)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 64; structured 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


LOWRANK_EPILOG = """\
Each chosen linear W (N outputs, K inputs: N*K weights) becomes two thinner ones, up (N x r) @
down (r x K): r*(N+K) weights. They are smaller only below the break-even rank N*K/(N+K)
(576x576: 288; 1536x576: 419), so --keep is the share of each linear's parameters the pair keeps:
rank = floor(keep * N*K/(N+K)), and keep must be in (0, 1).

  svd        plain truncated SVD of W: no data needed
  whitened   SVD-LLM: the SVD of W S, where S S^T = X^T X of calibration inputs X, so the dropped
             singular values are exactly the output error; needs calibration text (--calib)
  --ranks sensitivity   the same parameter total, spread by measured output error per linear
                        (needs calibration text for either method; two calibration passes)

At --keep 0.8 SmolLM2-135M's WikiText-2 perplexity goes from 36 to ~134 with whitened and is
destroyed by plain svd: small models have little low-rank slack; heal by distillation (`slm distill`).

The checkpoint loads in slmkit (generate, chat, eval, serve, bench). transformers cannot load it
(its config says llama, its weights are factor pairs), and GGUF export needs --densify, which
multiplies the factors back (the original size again).

examples:
  slm lowrank smollm2-135m-instruct --method whitened --keep 0.8 -o runs/smollm2-svdllm80
  slm lowrank smollm2-135m-instruct --keep 0.9 --ranks sensitivity -o runs/smollm2-svdllm90s
  slm eval runs/smollm2-svdllm80 --perplexity ../shared/data/corpus/wikitext2/valid.txt
  slm export gguf runs/smollm2-svdllm80 smollm2-svdllm80.gguf --densify
"""


def _add_lowrank(sub) -> None:
    p = sub.add_parser("lowrank", help="low-rank factorization of the linears: plain or whitened SVD (SVD-LLM)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LOWRANK_EPILOG)
    _add_model(p)
    p.add_argument("-o", "--out", required=True, help="output directory (a factorized HF-style checkpoint)")
    p.add_argument("--method", default="whitened", metavar="{svd,whitened}",
                   help="svd: plain truncated SVD; whitened: SVD-LLM, calibrated (default)")
    p.add_argument("--keep", type=float, default=0.8,
                   help="share of each linear's parameters kept, in (0, 1) (default 0.8)")
    p.add_argument("--ranks", default="uniform", metavar="{uniform,sensitivity}",
                   help="uniform: every linear keeps --keep (default); sensitivity: same total, per-layer ranks "
                        "from measured output error")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linears to factorize (add lm_head for the output head; never the embedding)")
    p.add_argument("--calib", help="calibration text file or `slm prepare` directory (whitened or sensitivity; "
                                   "default: the start of the shared WikiText-2 valid text)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--damp", type=float, default=0.01,
                   help="whitened: ridge (share of X^T X's mean diagonal) used when X^T X is not positive definite")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _add_config_verb(sub, verb: str, help: str, cls_name: str, module: str, example: str,
                     resumable: bool = False) -> None:
    """A verb driven by a typed config: --config YAML plus key=value overrides (listed in --help)."""
    p = sub.add_parser(verb, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_help(cls_name, module))
    p.add_argument("--config", help=f"YAML file, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file's")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")


def _config_help(cls_name: str, module: str) -> str | None:
    """The settings of a config dataclass, for `--help` only (it imports the module, maybe torch)."""
    if not HELP_WANTED:
        return None
    import importlib

    from slmkit.config import describe

    return "settings (key=value, nested with dots):\n" + "\n".join(
        describe(getattr(importlib.import_module(module), cls_name)))


def main(argv: list[str] | None = None) -> int:
    global HELP_WANTED
    argv = sys.argv[1:] if argv is None else argv
    HELP_WANTED = "-h" in argv or "--help" in argv
    args = build_parser().parse_args(argv)
    from slmkit.errors import SlmError

    try:
        return VERBS[args.verb](args) or 0
    except SlmError as err:
        if args.debug:
            raise
        print(f"slm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------


def _setup_threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _load_generator(args):
    """(model name, TextGenerator) on the engine the arguments ask for."""
    import torch

    from slmkit.generate import TextGenerator
    from slmkit.load import load

    _setup_threads(args)
    speculate = _speculate_spec(args.speculate)
    from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, runtime_files

    torch_only = [flag for flag, on in (("--compile", args.compile), ("--speculate", args.speculate)) if on]
    if choose_engine(args.engine, args.model, torch_only) == "llamacpp":
        files = runtime_files(args.model, args.gguf_type, progress=lambda m: print(m, file=sys.stderr))
        engine = LlamaCppEngine.for_files(files, args.context, threads=args.threads)
        return files.config.name or args.model, TextGenerator(None, files.tokenizer, engine=engine)
    dtype = getattr(torch, args.dtype)
    loaded = load(args.model, dtype=dtype, merge=True)
    drafter = _drafter(speculate, loaded, dtype, args.context)
    return loaded.source.config.name or args.model, TextGenerator(
        loaded.model, loaded.tokenizer, args.context, compile=args.compile, drafter=drafter,
        draft_tokens=args.draft_tokens)


def _speculate_spec(spec: str | None) -> str | None:
    """'lookup', a draft model's name, or None; refused in one line before anything loads."""
    from slmkit.errors import SlmError

    if spec is None or spec == "lookup":
        return spec
    if not spec.startswith("draft=") or not spec[len("draft="):]:
        raise SlmError(f"--speculate '{spec}': give 'lookup' or 'draft=MODEL' (a smaller model with the same tokenizer)")
    return spec[len("draft="):]


def _drafter(speculate: str | None, target, dtype, context: int | None):
    from slmkit.errors import SlmError
    from slmkit.infer.engine import Engine
    from slmkit.infer.speculate import DraftModel, PromptLookup
    from slmkit.load import load
    from slmkit.tokenizer import same_vocabulary

    if speculate is None:
        return None
    if speculate == "lookup":
        return PromptLookup()
    draft = load(speculate, dtype=dtype, merge=True)
    if draft.tokenizer is None or target.tokenizer is None or not same_vocabulary(draft.tokenizer, target.tokenizer):
        raise SlmError(f"the draft model '{speculate}' has another tokenizer than the target; speculative decoding "
                       "needs the same vocabulary (draft with a model distilled from this one, or use --speculate lookup)")
    return DraftModel(Engine(draft.model, context))


def _sampling(args):
    from slmkit.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _output_format(args):
    """The OutputFormat that --json / --json-schema / --choices ask for (None for free text); bad
    input is refused here, before the model loads."""
    from slmkit.errors import SlmError
    from slmkit.infer.constrain import OutputFormat

    if args.choices is not None:
        return OutputFormat("choices", choices=tuple(c.strip() for c in args.choices.split(",") if c.strip()))
    if args.json:
        return OutputFormat("json_object")
    if args.json_schema is None:
        return None
    text = args.json_schema
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise SlmError(f"--json-schema '{text}' is neither a file nor an inline JSON object")
        text = Path(text).read_text()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise SlmError(f"--json-schema is not valid JSON ({error}); check its quoting") from None
    return OutputFormat("json_schema", schema=schema)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    output_format = _output_format(args)
    _, gen = _load_generator(args)
    params = _sampling(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = gen.tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    else:
        sys.stdout.write(prompt)

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = gen.complete([prompt], params, args.stop, show, truncate=args.truncate, output_format=output_format)[0]
    g = result.generation
    print(file=sys.stdout)
    print(f"[{result.prompt_tokens} prompt tokens in {g.prefill_seconds:.2f}s, {result.completion_tokens} new "
          f"at {g.decode_tokens_per_second:.1f} tokens/s{_kept(g)}, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def _kept(g) -> str:
    """How many drafted tokens speculative decoding kept (empty when it did not speculate)."""
    return f", {g.accepted}/{g.drafted} drafted tokens kept" if g.drafted else ""


def cmd_chat(args) -> int:
    from slmkit.chat import run_chat

    name, gen = _load_generator(args)
    return run_chat(gen, _sampling(args), args.system, args.stop, name=name)


def cmd_info(args) -> int:
    from slmkit.card import print_card
    from slmkit.load import inspect

    print_card(inspect(args.model))
    return 0


def cmd_size(args) -> int:
    from slmkit.card import print_size
    from slmkit.load import inspect

    print_size(inspect(args.model).config, args.bits, args.group_size, args.context, args.batch, args.kv_bits)
    return 0


def cmd_presets(args) -> int:
    from slmkit.card import print_presets

    print_presets()
    return 0


def cmd_convert(args) -> int:
    import torch

    from slmkit.errors import SlmError

    dst = Path(args.dst)
    if not args.dst.endswith(".gguf") and dst.exists() and not dst.is_dir():
        raise SlmError(f"'{args.dst}' is an existing file, but a name without .gguf means a Hugging Face "
                       "directory; give a new directory name, or end the name in .gguf to write GGUF")

    loaded = _load_whole(args.src)
    if args.dst.endswith(".gguf"):
        from slmkit.interop.gguf import write_gguf

        if loaded.tokenizer is None:
            raise SlmError(f"'{args.src}' has no tokenizer; a GGUF file needs one")
        out = write_gguf(loaded.model, loaded.tokenizer, args.dst, args.type)
    else:
        from slmkit.interop.hf import save_hf

        out = save_hf(loaded.model, loaded.tokenizer, args.dst, getattr(torch, args.dtype))
    print(f"wrote {out}")
    return 0


def cmd_quantize(args) -> int:
    import time

    from slmkit.compress.quant.quantize import CALIBRATED, QuantConfig, quantize_model
    from slmkit.data.calibration import calibration_ids
    from slmkit.interop.hf import save_checkpoint

    _setup_threads(args)
    cfg = QuantConfig(method=args.method, group_size=args.group_size, pad_groups=args.pad_groups,
                      lm_head=not args.keep_lm_head, calib=args.calib, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len, act_order=args.act_order, skip=args.skip)
    loaded = _load_whole(args.model)
    started = time.perf_counter()
    ids = None
    if cfg.method in CALIBRATED:
        ids = calibration_ids(loaded.tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len,
                              loaded.model.config.vocab_size)
    report = quantize_model(loaded.model, cfg, ids)  # checks every setting before any work
    out = save_checkpoint(loaded.model, loaded.tokenizer, args.out)
    print(report.summary())
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


def cmd_prune(args) -> int:
    import time

    from slmkit.compress.prune import PruneConfig, check_prune, prune_model
    from slmkit.data.calibration import calibration_ids
    from slmkit.interop.hf import save_checkpoint

    _setup_threads(args)
    loaded = _load_whole(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    if args.structured:
        from slmkit.compress.structured import StructuredConfig, check_structured, prune_structured

        cfg = StructuredConfig(params=args.params, ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads,
                               hidden=args.hidden, layers=args.layers, layer_metric=args.layer_metric,
                               per_layer=args.per_layer, refit=args.refit, calib=args.calib, calib_samples=args.calib_samples or 32,
                               calib_seq_len=args.calib_seq_len)
        check_structured(model, cfg)  # every setting checked before calibration is read
        ids = calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size)
        model, report = prune_structured(model, cfg, ids)
    else:
        cfg = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, calib=args.calib,
                          calib_samples=args.calib_samples or 64, calib_seq_len=args.calib_seq_len)
        check_prune(model, cfg)
        ids = (calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size)
               if cfg.calibrated else None)
        report = prune_model(model, cfg, ids)
    out = save_checkpoint(model, tokenizer, args.out)
    print(report.summary())
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


def cmd_lowrank(args) -> int:
    import time

    from slmkit.compress.lowrank import LowRankConfig, check_lowrank, factorize_model
    from slmkit.data.calibration import calibration_ids
    from slmkit.errors import SlmError
    from slmkit.interop.hf import save_checkpoint

    _setup_threads(args)
    cfg = LowRankConfig(method=args.method, keep=args.keep, ranks=args.ranks, calib=args.calib,
                        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                        targets=[t.strip() for t in args.targets.split(",") if t.strip()], damp=args.damp)
    loaded = _load_whole(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_lowrank(model, cfg)  # every setting checked before calibration text is read
    started = time.perf_counter()
    ids = None
    if cfg.calibrated:
        if tokenizer is None:
            raise SlmError(f"'{args.model}' has no tokenizer to read calibration text with; use --method svd "
                           "--ranks uniform, or a model directory with tokenizer.json")
        ids = calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size)
    report = factorize_model(model, cfg, ids)
    out = save_checkpoint(model, tokenizer, args.out)  # PATH.partial, renamed when complete
    print(report.summary())
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


def cmd_eval(args) -> int:
    import re
    import time

    import torch
    from rich.console import Console

    from slmkit.errors import SlmError
    from slmkit.evals.api import (
        evaluate,
        model_info,
        parse_shots,
        results_table,
        save_results,
    )
    from slmkit.evals.tasks import DEFAULT_SUITE, TASKS

    if args.tasks == "list":
        print("tasks: " + ", ".join(TASKS) + ", mmlu_SUBJECT (one MMLU subject, e.g. mmlu_anatomy), NAME:val (a "
              "fine-tuning task's validation split, e.g. symptom2disease:val)")
        return 0
    _setup_threads(args)
    shots = parse_shots(args.shots)
    names = [t.strip() for t in (args.tasks or ",".join(DEFAULT_SUITE)).split(",") if t.strip()]
    limit = args.limit
    if limit is None and not args.tasks and not args.full:
        limit = dict(DEFAULT_SUITE)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name) or "model"
    out = args.output or Path("runs") / "eval" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.endpoint:
        from slmkit.evals.endpoint import EndpointLM

        if args.perplexity:
            raise SlmError("--perplexity needs the model's weights here; it does not work with --endpoint")
        lm = EndpointLM(args.endpoint, args.model, os.environ.get("OPENAI_API_KEY"))
        doc = evaluate(lm, names, shots, limit, args.seed, args.data_dir, model_name=f"{args.endpoint} {args.model}")
        Console().print(results_table(doc))
        print(f"wrote {save_results(doc, out)}")
        return 0
    if args.perplexity:
        from slmkit.evals.perplexity import text_perplexity
        from slmkit.infer.llamacpp import choose_engine

        choose_engine(args.engine, args.model, ["--perplexity"])  # refuses --engine llamacpp in one line
        loaded = _eval_model(args.model, getattr(torch, args.dtype))
        result = text_perplexity(loaded.model, loaded.tokenizer, args.perplexity, stride=args.stride)
        print(result.summary())
        doc = {"model": args.model, "model_info": model_info(loaded),
               "perplexity": {**result.__dict__, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}}
    else:
        lm, info = _eval_lm(args)
        doc = evaluate(lm, names, shots, limit, args.seed, args.data_dir, model_name=args.model,
                       on_result=lambda partial: save_results({**partial, "model_info": info, "partial": True}, out))
        doc["model_info"] = info
        Console().print(results_table(doc))
    print(f"wrote {save_results(doc, out)}")
    return 0


def _eval_model(spec: str, dtype):
    from slmkit.errors import SlmError
    from slmkit.load import load

    loaded = load(spec, dtype=dtype, merge=True)
    if loaded.tokenizer is None:
        raise SlmError("this model has no tokenizer; evaluation reads text (load a GGUF or an HF directory "
                       "with tokenizer.json)")
    return loaded


def _eval_lm(args):
    """The scorer for `slm eval` on the chosen engine, and what the report needs to know of the model."""
    import torch

    from slmkit.evals.api import model_info
    from slmkit.evals.lm import LlamaCppLM, LocalLM
    from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, gguf_kind, runtime_files

    if choose_engine(args.engine, args.model) == "llamacpp":
        files = runtime_files(args.model, args.gguf_type, progress=lambda m: print(m, file=sys.stderr))
        engine = LlamaCppEngine.for_files(files, threads=args.threads)
        size = files.file_bytes
        return LlamaCppLM(engine, files.tokenizer), {
            "params": engine.parameters, "file_mib": size / 2**20, "bits": round(8 * size / engine.parameters, 2),
            "quantization": None, "gguf_type": gguf_kind(files.gguf, args.gguf_type).upper(),
            "engine": "llamacpp"}
    loaded = _eval_model(args.model, getattr(torch, args.dtype))
    return LocalLM(loaded.model, loaded.tokenizer, batch_size=args.batch_size), model_info(loaded)


def cmd_bench(args) -> int:
    import time
    from dataclasses import asdict

    from rich.console import Console

    from slmkit.errors import SlmError
    from slmkit.evals.api import save_results
    from slmkit.evals.device import (
        SWEEP_PRESETS,
        BenchSettings,
        bench_table,
        measure,
        sweep_plot,
    )
    from slmkit.infer.llamacpp import choose_engine

    try:
        batches = tuple(int(b) for b in args.batch.split(",") if b.strip())
    except ValueError:
        raise SlmError(f"--batch takes whole numbers separated by commas (e.g. 1,8), not '{args.batch}'") from None
    if not batches or min(batches) < 1 or args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        raise SlmError("--batch values and --runs must be >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    settings = BenchSettings(args.prompt_tokens, args.new_tokens, batches, args.runs, args.threads, args.dtype,
                             engine=args.engine, gguf_type=args.gguf_type)
    models = list(dict.fromkeys(args.models + (list(SWEEP_PRESETS) if args.sweep else [])))
    if args.engine == "llamacpp":
        for spec in models:  # a missing extra or an architecture without weights: one line, before any process
            choose_engine(args.engine, spec)
    results = []
    for spec in models:
        print(f"measuring {spec} ...", flush=True)
        results.append(measure(spec, settings))
    Console().print(bench_table(results, settings))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.output or Path("runs") / "bench" / f"bench-{stamp}.json")
    doc = {"settings": asdict(settings), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "results": [asdict(r) for r in results]}
    save_results(json.loads(json.dumps(doc)), out)
    print(f"wrote {out}")
    if args.sweep:
        print(f"wrote {sweep_plot(results, out.with_suffix('.png'))}")
    return 0


def cmd_serve(args) -> int:
    from slmkit.serve.run import serve

    _setup_threads(args)
    return serve(args)


def cmd_route_eval(args) -> int:

    import torch
    from rich.console import Console
    from rich.table import Table

    from slmkit.errors import SlmError
    from slmkit.evals.api import default_data_dir
    from slmkit.evals.lm import LocalLM
    from slmkit.evals.tasks import make_task
    from slmkit.load import load
    from slmkit.serve.route_eval import route_eval, save

    _setup_threads(args)
    try:
        thresholds = None if args.thresholds == "auto" else [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise SlmError(f"--thresholds must be comma-separated numbers, got '{args.thresholds}'") from None
    task = make_task(args.task, Path(args.data_dir) if args.data_dir else default_data_dir())

    def lm_for(spec: str):
        if spec.startswith(("http://", "https://")):
            from slmkit.evals.endpoint import EndpointLM
            from slmkit.serve.remote import RemoteBackend

            remote = RemoteBackend.from_spec(spec)
            return EndpointLM(remote.url, remote.model or "default", remote.key), remote.name
        loaded = load(spec, dtype=getattr(torch, args.dtype))
        return LocalLM(loaded.model, loaded.tokenizer), Path(spec.rstrip("/")).name

    (local, local_name), (remote, remote_name) = lm_for(args.local), lm_for(args.remote)
    result = route_eval(local, remote, task, args.limit, thresholds)
    path, png = save(result, Path(args.out), local_name, remote_name)
    table = Table(title=f"{task.name} {result['metric']} (n={result['n']}): local only {result['local_only']:.3f}, "
                        f"remote only {result['remote_only']:.3f}")
    for column in ("threshold", "escalated", "accuracy"):
        table.add_column(column, justify="right")
    for point in result["curve"]:
        table.add_row(f"{point['threshold']:g}", f"{point['escalated']:.1%}", f"{point['accuracy']:.3f}")
    Console().print(table)
    print(f"wrote {path} and {png}")
    return 0


def cmd_report(args) -> int:

    from slmkit.evals.report import write_report

    print(f"wrote {write_report([Path(p) for p in args.results], Path(args.out))}")
    return 0


def cmd_export(args) -> int:
    import torch

    from slmkit.errors import SlmError
    from slmkit.interop.gguf import write_gguf
    from slmkit.load import load

    if not args.out.endswith(".gguf"):
        raise SlmError(f"'{args.out}' should end in .gguf")
    if args.export_format == "gguf-lora":
        from slmkit.adapters.peft_format import is_adapter_dir
        from slmkit.interop.gguf_lora import write_gguf_lora

        if not is_adapter_dir(Path(args.adapter)):
            raise SlmError(f"'{args.adapter}' is not an adapter directory (no adapter_config.json)")
        loaded = load(args.adapter, dtype=torch.float32, base=args.base)
        out = write_gguf_lora(loaded.model, args.out, Path(args.adapter.rstrip("/")).name)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); run it over a GGUF of its base "
              f"({loaded.source.base}): llama-cli -m BASE.gguf --lora {out}")
        return 0
    loaded = _load_whole(args.model)
    if loaded.tokenizer is None:
        raise SlmError(f"'{args.model}' has no tokenizer; a GGUF file needs one")
    if args.densify and loaded.model.config.lowrank:
        from slmkit.compress.lowrank import densify

        print(f"densified {densify(loaded.model)} factorized linears")
    out = write_gguf(loaded.model, loaded.tokenizer, args.out, args.type)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


def _load_whole(spec: str):
    """MODEL in fp32 as one plain model: an adapter directory is merged into its base first (say so)."""
    import torch

    from slmkit.adapters.lora import lora_layers
    from slmkit.adapters.merge import merge_adapters
    from slmkit.load import load

    loaded = load(spec, dtype=torch.float32)
    if lora_layers(loaded.model):
        print(f"{merge_adapters(loaded.model).summary()} (for a separate llama.cpp adapter: slm export gguf-lora)")
    return loaded


def cmd_merge(args) -> int:
    import torch

    from slmkit.adapters.merge import merge_adapters
    from slmkit.adapters.peft_format import is_adapter_dir
    from slmkit.errors import SlmError
    from slmkit.load import load

    if not is_adapter_dir(Path(args.adapter)):
        raise SlmError(f"'{args.adapter}' is not an adapter directory (no adapter_config.json)")
    loaded = load(args.adapter, dtype=torch.float32, base=args.base)
    report = merge_adapters(loaded.model)
    from slmkit.interop.hf import save_checkpoint

    dtype = None if loaded.model.config.quantization else getattr(torch, args.dtype)  # codes keep their scales
    out = save_checkpoint(loaded.model, loaded.tokenizer, args.out, dtype)
    print(report.summary())
    print(f"wrote {out}")
    return 0


def cmd_prepare(args) -> int:
    from slmkit.config import load_config
    from slmkit.data.prepare import PrepareConfig, prepare, print_report

    overrides = [item for item in args.items if "=" in item]
    inputs = [item for item in args.items if "=" not in item]
    cfg = load_config(PrepareConfig, args.config, overrides)
    if inputs:
        cfg.inputs = inputs
    cfg.tokenizer = args.tokenizer or cfg.tokenizer
    cfg.out = args.out or cfg.out
    print_report(prepare(cfg), cfg.out)
    return 0


def cmd_tokenizer(args) -> int:
    from slmkit.data.prepare import split_documents
    from slmkit.data.readers import expand_inputs, read_documents
    from slmkit.tokenizer import bytes_per_token, train_tokenizer

    docs = [d for f in expand_inputs(args.inputs) for d in read_documents(f, args.text_field, args.separator)]
    if not docs:
        from slmkit.errors import SlmError

        raise SlmError("the inputs hold no documents")
    train_ids, val_ids = split_documents(list(range(len(docs))), args.val_fraction, args.seed)
    tokenizer = train_tokenizer((docs[i] for i in train_ids), args.vocab_size)
    tokenizer.save(args.out)
    held_out = [docs[i] for i in val_ids] or docs
    print(f"wrote {args.out}/tokenizer.json: {tokenizer.vocab_size} tokens, "
          f"{bytes_per_token(tokenizer, held_out):.2f} bytes per token on {len(held_out)} held-out documents")
    return 0


def cmd_pretrain(args) -> int:
    from slmkit.train.pretrain import PretrainConfig, run

    return _train_recipe(PretrainConfig, run, args, "model")


def cmd_distill(args) -> int:
    from slmkit.train.distill import DistillConfig, run

    return _train_recipe(DistillConfig, run, args, "student")


def _train_recipe(config_cls, run, args, what: str, final_hint=None) -> int:
    """Load a recipe config (YAML + key=value), run it, and say where the results are."""
    from slmkit.config import load_config
    from slmkit.train import dist

    cfg = load_config(config_cls, args.config, args.overrides)
    try:
        result = run(cfg, resume=args.resume)
    finally:
        dist.teardown()
    s = result.state
    best = f", best validation loss {s.best_val_loss:.4f} at step {s.best_step}" if s.best_val_loss else ""
    where = final_hint(result) if final_hint else result.run_dir / "final"
    print(f"stopped ({result.stop_reason}) at step {s.step} after {s.tokens:,} tokens{best}; "
          f"{what} in {where}, curves in {result.run_dir / 'loss.png'}")
    return 0


def cmd_finetune(args) -> int:
    from slmkit.train.finetune import FinetuneConfig, run

    return _train_recipe(FinetuneConfig, run, args, "the model", final_hint=lambda r: str(r.run_dir))


def cmd_synth(args) -> int:
    from slmkit.config import load_config
    from slmkit.data.synth import SynthConfig, print_report, synthesize

    print_report(synthesize(load_config(SynthConfig, args.config, args.overrides)))
    return 0


def cmd_plot(args) -> int:
    from slmkit.train.plot import plot_run

    print(f"wrote {plot_run(args.run)}")
    return 0


def cmd_demo(args) -> int:
    from slmkit.demo import run_demo

    _setup_threads(args)
    return run_demo(max_tokens=args.max_tokens)


VERBS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "size": cmd_size,
         "presets": cmd_presets, "convert": cmd_convert, "quantize": cmd_quantize, "prune": cmd_prune, "export": cmd_export,
         "merge": cmd_merge, "lowrank": cmd_lowrank,
         "eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "serve": cmd_serve,
         "route-eval": cmd_route_eval,
         "prepare": cmd_prepare, "tokenizer": cmd_tokenizer,
         "pretrain": cmd_pretrain, "distill": cmd_distill, "finetune": cmd_finetune, "synth": cmd_synth, "plot": cmd_plot, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())

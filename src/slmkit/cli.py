"""`slm <verb>`: the command line. Each verb is a small function; heavy modules load lazily.

Most verbs are a typed config dataclass (slmkit.jobs, slmkit.serve.config) whose flags are generated
by slmkit.cli_args: the field is the flag, its docstring the help, and `--config FILE.yaml` plus
`key=value` items set the same fields, so `slm quantize` and a `slm pipeline` stage share one config
and one implementation. Only the verb being run imports its config's module (the job modules import
torch; `slm --help` must stay fast).

Errors meant for the user (`SlmError`) print as one line and exit with status 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from slmkit.presets import DEFAULT_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slmkit never downloads models
HELP_WANTED = False  # set by main(): build the (costly) config listings only for --help

# verb (with its sub-verb) -> (module, config class, fields taken as positional arguments)
CONFIG_VERBS = {
    "generate": ("slmkit.jobs.generate", "GenerateJob", ("model", "prompt")),
    "chat": ("slmkit.jobs.generate", "ChatJob", ("model",)),
    "size": ("slmkit.jobs.tools", "SizeJob", ("model",)),
    "convert": ("slmkit.jobs.export", "ConvertJob", ("src", "dst")),
    "quantize": ("slmkit.jobs.compress", "QuantizeJob", ("model",)),
    "prune": ("slmkit.jobs.compress", "PruneJob", ("model",)),
    "lowrank": ("slmkit.jobs.compress", "LowRankJob", ("model",)),
    "eval": ("slmkit.jobs.evaluate", "EvalJob", ("model",)),
    "bench": ("slmkit.jobs.evaluate", "BenchJob", ("models",)),
    "serve": ("slmkit.serve.config", "ServeConfig", ("models",)),
    "route-eval": ("slmkit.jobs.route_eval", "RouteEvalJob", ()),
    "export gguf": ("slmkit.jobs.export", "GgufJob", ("model", "out")),
    "export gguf-lora": ("slmkit.jobs.export", "GgufLoraJob", ("adapter", "out")),
    "merge": ("slmkit.jobs.export", "MergeJob", ("base", "adapter")),
    "tokenizer train": ("slmkit.jobs.tools", "TokenizerJob", ("inputs",)),
    "demo": ("slmkit.jobs.tools", "DemoJob", ()),
}
NESTED = ("export", "tokenizer")  # verbs whose config verbs are one level down


def verb_path(argv: list[str]) -> str | None:
    """'quantize', 'export gguf', ...: the verb argv runs (the top-level parser has no valued options)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    return " ".join(words[:2]) if words[0] in NESTED and len(words) > 1 else words[0]


def _config_verb(sub, verb: str, wanted: str | None, **kwargs) -> argparse.ArgumentParser:
    """A verb whose flags come from its config dataclass; generated only when it is the one run."""
    if "epilog" in kwargs:  # examples keep their lines
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser(verb.split()[-1], **kwargs)
    if verb == wanted:
        from slmkit.cli_args import add_config_arguments

        module, name, positional = CONFIG_VERBS[verb]
        add_config_arguments(p, getattr(importlib.import_module(module), name), positional)
    return p


SERVE_EPILOG = """examples:
  slm serve                                    # the bundled model on http://127.0.0.1:8000 (chat page at /)
  slm serve small=runs/student/best big=smollm2-135m-instruct --api-key secret
  slm serve --route local=runs/student/best --route remote=http://127.0.0.1:8001/v1,model=smollm2-135m-instruct

Routing serves the model name 'auto': each request is answered by the local model unless the
policy escalates it to the remote one (any OpenAI-compatible URL; key=ENV_VAR names the variable
holding its API key). The answer's `slmkit_route` field and `x-slmkit-route` header say what happened.
"""


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The `slm` parser; `wanted` (a CONFIG_VERBS key) is the verb whose flags are generated."""
    parser = argparse.ArgumentParser(
        prog="slm", description="slmkit: small language models on your CPU, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    _config_verb(sub, "generate", wanted, help="continue a prompt (streams to stdout)")
    _config_verb(sub, "chat", wanted, help="talk to a model (/reset, /system TEXT, /exit)")
    p = sub.add_parser("info", help="model card: architecture, parameters, file and memory sizes")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"GGUF file, Hugging Face directory or preset name (`slm presets`); default '{DEFAULT_MODEL}', "
                        "the bundled SmolLM2-135M-Instruct")
    _config_verb(sub, "size", wanted, help="parameters, weight memory and KV-cache memory at a precision")
    sub.add_parser("presets", help="list the named architectures")
    _config_verb(sub, "convert", wanted, help="convert between GGUF and Hugging Face directories")
    _config_verb(sub, "quantize", wanted, help="int8 / int4 (RTN, GPTQ, AWQ) weights on packed CPU kernels",
                 epilog=QUANTIZE_EPILOG)
    _config_verb(sub, "prune", wanted, help="remove weights: magnitude / Wanda / SparseGPT (sparse or N:M), or "
                 "structured width and depth pruning", epilog=PRUNE_EPILOG)
    _config_verb(sub, "lowrank", wanted, help="low-rank factorization of the linears: plain or whitened SVD "
                 "(SVD-LLM)", epilog=LOWRANK_EPILOG)
    _config_verb(sub, "eval", wanted, help="benchmark tasks (lm-evaluation-harness formats) or a text's perplexity",
                 epilog=EVAL_EPILOG)
    _config_verb(sub, "bench", wanted, help="on-device latency and memory: TTFT, prefill and decode tokens/s, "
                 "peak memory", epilog=BENCH_EPILOG)
    _config_verb(sub, "serve", wanted, help="an OpenAI-compatible server (continuous batching, router, chat page "
                 "at /)", epilog=SERVE_EPILOG)
    _config_verb(sub, "route-eval", wanted, help="quality vs share escalated of the confidence router on a "
                 "labelled set", description="Score a local and a remote model on a multiple-choice task and "
                 "report, for each confidence threshold, the accuracy and share escalated a confidence router "
                 "gets (JSON and a PNG curve).")

    p = sub.add_parser("report", help="a markdown report and plots comparing variants from results JSON files")
    p.add_argument("results", nargs="+", help="JSON files or folders written by slm eval, slm bench or bench/quantize.py")
    p.add_argument("-o", "--out", default="runs/report", help="output folder (report.md and PNG plots)")

    p = sub.add_parser("export", help="write a model for other runtimes (GGUF for llama.cpp / ollama)")
    export_sub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    _config_verb(export_sub, "export gguf", wanted,
                 help="a llama-architecture GGUF file with the tokenizer and chat template")
    _config_verb(export_sub, "export gguf-lora", wanted,
                 help="a LoRA adapter as a llama.cpp adapter file (--lora in llama.cpp)",
                 description="Write an adapter directory (PEFT format) as a llama.cpp LoRA GGUF. Run it "
                 "over a GGUF export of its base: llama-cli -m base.gguf --lora OUT.gguf")
    _config_verb(sub, "merge", wanted,
                 help="fold an adapter into its base's weights (a quantized base is requantized)",
                 description="Write BASE with ADAPTER folded into its weights: an HF directory (or a "
                 "quantized checkpoint when BASE is quantized: dequantize, merge, requantize, and report "
                 "the error that adds).")

    p = sub.add_parser("prepare", help="filter, de-duplicate, split, tokenize and pack text into shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_help("PrepareConfig", "slmkit.data.prepare", "prepare" == wanted))
    p.add_argument("items", nargs="*", metavar="INPUT|key=value",
                   help="files, globs or directories to read, and key=value settings (listed below)")
    p.add_argument("--config", help="YAML file with settings (key=value arguments override it)")
    p.add_argument("--tokenizer", help="tokenizer.json directory or model (default: the bundled SmolLM2)")
    p.add_argument("--out", help="output directory")

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = p.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)
    _config_verb(tok_sub, "tokenizer train", wanted,
                 help="train a byte-level BPE tokenizer and report its compression")

    _add_config_verb(sub, "pretrain", "train a model from scratch on prepared data", "PretrainConfig",
                     "slmkit.train.pretrain", "configs/pretrain/tinystories-10m.yaml", wanted, resumable=True)
    _add_config_verb(sub, "distill", "train a student from a teacher's outputs (logit, hidden-state KD)",
                     "DistillConfig", "slmkit.train.distill", "configs/distill/tinystories-23m.yaml", wanted, resumable=True)
    _add_config_verb(sub, "finetune", "adapt a model to a task or domain: full, LoRA, DoRA or QLoRA",
                     "FinetuneConfig", "slmkit.train.finetune", "configs/finetune/symptom2disease-lora.yaml",
                     wanted, resumable=True)
    _add_config_verb(sub, "synth", "have a teacher write a corpus from seed prompts (sequence-level KD)",
                     "SynthConfig", "slmkit.data.synth", "synth.yaml holding the settings below (or key=value alone: count=200)", wanted)

    p = sub.add_parser("plot", help="plot train/validation loss and learning rate of a run")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")

    _config_verb(sub, "demo", wanted, help="the whole path on the bundled model in under 10 minutes "
                 "(slm pipeline configs/pipeline/demo.yaml)")
    _add_pipeline(sub)
    return parser


PIPELINE_EPILOG = """examples:
  slm pipeline configs/pipeline/symptom2disease.yaml --dry-run     # the plan, rough estimates, every check
  slm pipeline configs/pipeline/symptom2disease.yaml               # run it; again: only what changed reruns
  slm pipeline configs/pipeline/symptom2disease.yaml finetune.train.lr=5e-4   # fine-tune onward reruns
  slm pipeline configs/pipeline/tiny-story-teller.yaml --from quantize

Stages, in order (a recipe section turns one on; each section is that command's own config):
  base, prepare (slm prepare), prune (slm prune), lowrank (slm lowrank), distill (slm distill),
  finetune (slm finetune), quantize (slm quantize), evaluate (slm eval + slm bench per model),
  export (HF directory + model card, GGUF, llama.cpp adapter), serve (prints slm serve ...).
Each writes runs/<name>/NN-stage/ with its config and a fingerprint of its inputs: a stage whose
fingerprint matches is skipped, a kill -9 is continued (training resumes from its last checkpoint),
and runs/<name>/report.html + report.md compare every stage.
"""


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="base -> prune/distill -> fine-tune -> quantize -> evaluate -> export -> "
                       "serve from one YAML recipe, resumable, with a report page",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PIPELINE_EPILOG)
    p.add_argument("recipe", help="pipeline YAML, e.g. configs/pipeline/symptom2disease.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the recipe's "
                   "(nested with dots, e.g. finetune.train.lr=5e-4)")
    one = p.add_mutually_exclusive_group()
    one.add_argument("--from", dest="from_stage", metavar="STAGE", help="redo STAGE and every stage after it")
    one.add_argument("--only", metavar="STAGE", help="redo STAGE alone (the stages before it must be done)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what runs, time, disk, peak memory) "
                   "and check every stage's settings and inputs; do no work")
    p.add_argument("--serve", action="store_true", help="start `slm serve` on the final model at the end")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


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


def _add_config_verb(sub, verb: str, help: str, cls_name: str, module: str, example: str, wanted: str | None,
                     resumable: bool = False) -> None:
    """A verb driven by a typed config: --config YAML plus key=value overrides (listed in --help)."""
    p = sub.add_parser(verb, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_help(cls_name, module, verb == wanted))
    p.add_argument("--config", help=f"YAML file, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file's")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")


def _config_help(cls_name: str, module: str, wanted: bool) -> str | None:
    """The settings of a config dataclass, for the verb's own `--help` only (it imports the module,
    maybe torch)."""
    if not HELP_WANTED or not wanted:
        return None
    from slmkit.config import describe

    return "settings (key=value, nested with dots):\n" + "\n".join(
        describe(getattr(importlib.import_module(module), cls_name)))


def main(argv: list[str] | None = None) -> int:
    global HELP_WANTED
    argv = sys.argv[1:] if argv is None else argv
    HELP_WANTED = "-h" in argv or "--help" in argv
    parser = build_parser(verb_path(argv))
    args, extra = parser.parse_known_args(argv)
    _take_leftovers(parser, args, extra)
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


def _take_leftovers(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Positional items argparse left over (those after an option) join a verb's trailing items;
    an unknown option is refused, naming the closest one."""
    from slmkit.cli_args import SPEC

    trailing = "overrides" if hasattr(args, "overrides") else "items" if hasattr(args, "items") else None
    unknown = [e for e in extra if e.startswith("-") and e != "-"]
    if unknown or (extra and trailing is None):
        import difflib

        spec = getattr(args, SPEC, None)
        verb_parser = spec.parser if spec else parser
        options = [s for a in verb_parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(unknown[0].partition("=")[0], options, n=1) if unknown else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        verb_parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if extra:
        setattr(args, trailing, [*(getattr(args, trailing) or []), *extra])


# ---------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------


def _job(args):
    """The verb's config: its defaults < --config FILE.yaml < key=value items < flags."""
    from slmkit.cli_args import SPEC, config_from_args

    return config_from_args(getattr(args, SPEC).cls, args)


def cmd_generate(args) -> int:
    from slmkit.jobs.generate import run_generate

    return run_generate(_job(args))


def cmd_chat(args) -> int:
    from slmkit.chat import run_chat
    from slmkit.jobs.generate import load_generator

    job = _job(args)
    params = job.sampling.params()  # bad settings: refused before the model loads
    name, gen = load_generator(job.model, job.runtime)
    return run_chat(gen, params, job.system, job.sampling.stop, name=name)


def cmd_info(args) -> int:
    from slmkit.card import print_card
    from slmkit.load import inspect

    print_card(inspect(args.model))
    return 0


def cmd_size(args) -> int:
    from slmkit.card import print_size
    from slmkit.errors import SlmError
    from slmkit.load import inspect

    job = _job(args)
    if not job.model:
        raise SlmError("give a MODEL: a GGUF file, Hugging Face directory or preset name (`slm presets`)")
    print_size(inspect(job.model).config, job.bits, job.group_size, job.context, job.batch, job.kv_bits)
    return 0


def cmd_presets(args) -> int:
    from slmkit.card import print_presets

    print_presets()
    return 0


def cmd_convert(args) -> int:
    from slmkit.jobs.export import run_convert

    run_convert(_job(args))
    return 0


def cmd_quantize(args) -> int:
    from slmkit.jobs.compress import run_quantize

    run_quantize(_job(args))
    return 0


def cmd_prune(args) -> int:
    from slmkit.jobs.compress import run_prune

    run_prune(_job(args))
    return 0


def cmd_lowrank(args) -> int:
    from slmkit.jobs.compress import run_lowrank

    run_lowrank(_job(args))
    return 0


def cmd_eval(args) -> int:
    from dataclasses import replace

    from rich.console import Console

    from slmkit.evals.api import results_table
    from slmkit.evals.tasks import TASKS
    from slmkit.jobs.evaluate import eval_output, run_eval

    job = _job(args)
    if job.tasks == "list":
        print("tasks: " + ", ".join(TASKS) + ", mmlu_SUBJECT (one MMLU subject, e.g. mmlu_anatomy), NAME:val (a "
              "fine-tuning task's validation split, e.g. symptom2disease:val)")
        return 0
    job = replace(job, output=str(eval_output(job)))  # one path, said at the end
    doc = run_eval(job)
    if "results" in doc:
        Console().print(results_table(doc))
    print(f"wrote {job.output}")
    return 0


def cmd_bench(args) -> int:
    from rich.console import Console

    from slmkit.evals.device import bench_table, sweep_plot
    from slmkit.jobs.evaluate import run_bench

    job = _job(args)
    results, out = run_bench(job, log=lambda message: print(message, flush=True))
    Console().print(bench_table(results, job.settings))
    print(f"wrote {out}")
    if job.sweep:
        print(f"wrote {sweep_plot(results, out.with_suffix('.png'))}")
    return 0


def cmd_serve(args) -> int:
    from slmkit.serve.run import serve

    return serve(_job(args))


def cmd_route_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from slmkit.jobs.route_eval import run_route_eval

    result, path, png = run_route_eval(_job(args))
    table = Table(title=f"{result['task']} {result['metric']} (n={result['n']}): local only "
                        f"{result['local_only']:.3f}, remote only {result['remote_only']:.3f}")
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
    from slmkit.jobs.export import run_gguf, run_gguf_lora

    (run_gguf_lora if args.export_format == "gguf-lora" else run_gguf)(_job(args))
    return 0


def cmd_merge(args) -> int:
    from slmkit.jobs.export import run_merge

    run_merge(_job(args))
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
    from slmkit.jobs.tools import run_tokenizer

    run_tokenizer(_job(args))
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
    from slmkit.errors import SlmError

    job = _job(args)
    if not Path(job.recipe).is_file():
        raise SlmError(f"the demo recipe '{job.recipe}' is not here; run `slm demo` from the slmkit checkout "
                       "(or give recipe=PATH)")
    return _run_pipeline(job.recipe, [], job.threads)


def cmd_pipeline(args) -> int:
    from slmkit.pipeline.run import Options

    options = Options(from_stage=args.from_stage, only=args.only, dry_run=args.dry_run, serve=args.serve)
    return _run_pipeline(args.recipe, args.overrides, args.threads, options)


def _run_pipeline(recipe: str, overrides: list[str], threads: int | None, options=None) -> int:
    import torch

    from slmkit.pipeline.run import Options, run_pipeline
    from slmkit.pipeline.summary import print_summary

    if threads:
        torch.set_num_threads(threads)
    options = options or Options()
    result = run_pipeline(recipe, overrides, options)
    if options.dry_run:
        return 0
    print_summary(result["rows"], result["answers"])
    print(f"report: {result['report']} (and {result['markdown']})")
    if options.serve:
        command = result.get("serve") or ["slm", "serve", result["final"]]
        os.execv(sys.executable, [sys.executable, "-m", "slmkit.cli", *command[1:]])
    return 0


VERBS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "size": cmd_size,
         "presets": cmd_presets, "convert": cmd_convert, "quantize": cmd_quantize, "prune": cmd_prune, "export": cmd_export,
         "merge": cmd_merge, "lowrank": cmd_lowrank,
         "eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "serve": cmd_serve,
         "route-eval": cmd_route_eval,
         "prepare": cmd_prepare, "tokenizer": cmd_tokenizer,
         "pretrain": cmd_pretrain, "distill": cmd_distill, "finetune": cmd_finetune, "synth": cmd_synth, "plot": cmd_plot, "demo": cmd_demo,
         "pipeline": cmd_pipeline}

if __name__ == "__main__":
    sys.exit(main())

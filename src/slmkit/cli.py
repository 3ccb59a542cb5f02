"""`slm <verb>`: the command line, one table of verbs.

Each verb is one row of `VERBS`: its name, its config dataclass, the settings taken as positional
arguments, the function that runs it, and its help. Every verb's flags, `--config FILE.yaml` and
`key=value` items are generated from its dataclass the same way (slmkit.cli_args: the field is the
flag, its docstring the help), so `slm quantize` and a `slm pipeline` stage share one config and
one implementation, and adding a verb is one row here plus its job module. Only the verb being
run imports its module (the job modules import torch; `slm --help` must stay fast), which is why
the table names modules as strings.

Errors meant for the user (`SlmError`) print as one line and exit with status 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from dataclasses import dataclass

from slmkit.cli_args import SPEC, add_config_arguments, config_from_args
from slmkit.errors import SlmError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slmkit never downloads models


@dataclass(frozen=True)
class Verb:
    name: str  # "quantize", or "export gguf" for a verb one level down
    job: str  # "module:Class": the config dataclass whose fields are the verb's settings
    run: str  # "module:function": run(job) -> exit status (None or a non-int result: 0)
    help: str
    positional: tuple[str, ...] = ()  # settings taken as positional arguments, in order
    epilog: str = ""  # "module:NAME" of a string: examples and notes, kept as written
    description: str = ""


J = "slmkit.jobs."
VERBS = (
    Verb("generate", J + "generate:GenerateJob", J + "generate:run_generate", "continue a prompt (streams to stdout)",
         ("model", "prompt")),
    Verb("chat", J + "generate:ChatJob", J + "generate:run_chat", "talk to a model (/reset, /system TEXT, /exit)",
         ("model",)),
    Verb("info", J + "tools:InfoJob", J + "tools:run_info",
         "model card: family, architecture, parameters, file and memory sizes", ("model",)),
    Verb("size", J + "tools:SizeJob", J + "tools:run_size",
         "parameters, weight memory and KV-cache memory at a precision", ("model",)),
    Verb("presets", J + "tools:PresetsJob", J + "tools:run_presets", "list the named architectures"),
    Verb("tokenize", J + "tools:TokenizeJob", J + "tools:run_tokenize",
         "show how a model's tokenizer splits a text (ids and pieces)", ("model", "text")),
    Verb("template", J + "template:TemplateJob", J + "template:run_template",
         "show the text a chat template makes of a conversation (and what a fine-tune trains on)", ("model",)),
    Verb("convert", J + "export:ConvertJob", J + "export:run_convert",
         "convert between GGUF and Hugging Face directories", ("src", "dst")),
    Verb("quantize", J + "compress:QuantizeJob", J + "compress:run_quantize",
         "int8 / int4 (RTN, GPTQ, AWQ) weights on packed CPU kernels", ("model",), J + "compress:QUANTIZE_EXAMPLES"),
    Verb("prune", J + "compress:PruneJob", J + "compress:run_prune", "remove weights: magnitude / Wanda / SparseGPT "
         "(sparse or N:M), or structured width and depth pruning", ("model",), J + "compress:PRUNE_NOTES"),
    Verb("lowrank", J + "compress:LowRankJob", J + "compress:run_lowrank",
         "low-rank factorization of the linears: plain or whitened SVD (SVD-LLM)", ("model",),
         J + "compress:LOWRANK_NOTES"),
    Verb("eval", J + "evaluate:EvalJob", J + "evaluate:eval_verb",
         "benchmark tasks (lm-evaluation-harness formats) or a text's perplexity", ("model",),
         J + "evaluate:EVAL_EXAMPLES"),
    Verb("bench", J + "evaluate:BenchJob", J + "evaluate:bench_verb",
         "on-device latency and memory: TTFT, prefill and decode tokens/s, peak memory", ("models",),
         J + "evaluate:BENCH_EXAMPLES"),
    Verb("serve", "slmkit.serve.config:ServeConfig", "slmkit.serve.run:serve",
         "an OpenAI-compatible server (continuous batching, router, chat page at /)", ("models",),
         "slmkit.serve.config:SERVE_EXAMPLES"),
    Verb("route-eval", J + "route_eval:RouteEvalJob", J + "route_eval:route_eval_verb",
         "quality vs share escalated of the confidence router on a labelled set",
         description="Score a local and a remote model on a multiple-choice task and report, for each confidence "
         "threshold, the accuracy and share escalated a confidence router gets (JSON and a PNG curve)."),
    Verb("embed", J + "embed:EmbedJob", J + "embed:run_embed",
         "text embeddings: mean-pooled, L2-normalised final hidden states of each text, as a .npy",
         ("model", "input")),
    Verb("report", J + "tools:ReportJob", J + "tools:run_report",
         "a markdown report and plots comparing variants from results JSON files", ("results",)),
    Verb("export gguf", J + "export:GgufJob", J + "export:run_gguf",
         "a GGUF file of the model's llama.cpp architecture, with its tokenizer and chat template", ("model", "out")),
    Verb("export gguf-lora", J + "export:GgufLoraJob", J + "export:run_gguf_lora",
         "a LoRA adapter as a llama.cpp adapter file (--lora in llama.cpp)", ("adapter", "out"),
         description="Write an adapter directory (PEFT format) as a llama.cpp LoRA GGUF. Run it over a GGUF export "
         "of its base: llama-cli -m base.gguf --lora OUT.gguf"),
    Verb("export ollama", J + "export:OllamaJob", J + "export:run_ollama",
         "a directory Ollama imports: the GGUF (and a LoRA adapter's GGUF) with a Modelfile", ("model", "out"),
         description="Write RUN as DIR/model.gguf (an adapter run: its base, plus DIR/adapter.gguf) and "
         "DIR/Modelfile (FROM, ADAPTER, TEMPLATE from the chat template, PARAMETER stop). Then: "
         "ollama create NAME -f DIR/Modelfile"),
    Verb("export onnx", J + "export:OnnxJob", J + "export:run_onnx",
         "an ONNX Runtime GenAI directory (int4 / int8 / fp32) for phones, desktops and edge boxes", ("model", "out"),
         description="Write MODEL as OUT/model.onnx (+ external weights), genai_config.json and the tokenizer, built "
         "by onnxruntime-genai's model builder (GroupQueryAttention with the KV cache, MatMulNBits weights). Load "
         "it with onnxruntime_genai.Model(OUT). Needs the [onnx] extra."),
    Verb("export executorch", J + "export:ExecutorchJob", J + "export:run_executorch",
         "an ExecuTorch program (.pte, XNNPACK: 8da4w / int8 / fp32) for Android, iOS and embedded Linux",
         ("model", "out"),
         description="Write MODEL as OUT.pte: traced with a static KV cache and ExecuTorch's custom SDPA, quantized "
         "with ExecuTorch's TorchAO recipe and lowered to XNNPACK, with the constant methods its LLM runner reads; "
         "the tokenizer and chat template go to OUT_tokenizer/. Run it with `slm generate OUT.pte` or ExecuTorch's "
         "TextLLMRunner. Needs the [executorch] extra."),
    Verb("export litert", J + "export:LitertJob", J + "export:run_litert",
         "a LiteRT (TensorFlow Lite) file (int8 / int4 / fp32) for Android, iOS and embedded Linux", ("model", "out"),
         description="Write MODEL as OUT.tflite through Google's converter (litert-torch): signatures prefill and "
         "decode with the KV caches as inputs and outputs; the tokenizer and chat template go to OUT_tokenizer/. "
         "Run it with `slm generate OUT.tflite` or LiteRT's Interpreter. Needs the [litert] extra, which conflicts "
         "with the [test] extra (see the README)."),
    Verb("merge", J + "export:MergeJob", J + "export:run_merge",
         "fold an adapter into its base's weights (a quantized base is requantized)", ("base", "adapter"),
         description="Write BASE with ADAPTER folded into its weights: an HF directory (or a quantized checkpoint "
         "when BASE is quantized: dequantize, merge, requantize, and report the error that adds)."),
    Verb("prepare", "slmkit.data.prepare:PrepareConfig", J + "tools:run_prepare",
         "filter, de-duplicate, split, tokenize and pack text into shards", ("inputs",)),
    Verb("tokenizer train", J + "tools:TokenizerJob", J + "tools:run_tokenizer",
         "train a byte-level BPE tokenizer and report its compression", ("inputs",)),
    Verb("pretrain", "slmkit.train.pretrain:PretrainConfig", J + "train:run_pretrain",
         "train a model from scratch on prepared data (e.g. --config configs/pretrain/tinystories-10m.yaml)"),
    Verb("distill", "slmkit.train.distill:DistillConfig", J + "train:run_distill",
         "train a student from a teacher's outputs (logit, hidden-state KD; --config configs/distill/...)"),
    Verb("finetune", "slmkit.train.adapt:FinetuneConfig", J + "train:run_finetune",
         "adapt a model to a task or domain: full, LoRA, DoRA or QLoRA; DPO or ORPO on preference pairs (--config configs/finetune/...)"),
    Verb("synth", "slmkit.data.synth:SynthConfig", J + "tools:run_synth",
         "have a teacher write a corpus from seed prompts (sequence-level KD)"),
    Verb("plot", J + "tools:PlotJob", J + "tools:run_plot", "plot train/validation loss and learning rate of a run",
         ("run",)),
    Verb("demo", "slmkit.pipeline.verb:DemoJob", "slmkit.pipeline.verb:run_demo",
         "the whole path on the bundled model in about 8 minutes on 2 cores (slm pipeline configs/pipeline/demo.yaml)"),
    Verb("pipeline", "slmkit.pipeline.run:PipelineJob", "slmkit.pipeline.verb:run_pipeline_verb",
         "base -> prune/distill -> fine-tune -> quantize -> evaluate -> export -> serve from one YAML recipe, "
         "resumable, with a report page", ("recipe", "overrides"), "slmkit.pipeline.verb:PIPELINE_EXAMPLES"),
)
BY_NAME = {verb.name: verb for verb in VERBS}
GROUPS = {"export": "write a model for other runtimes (GGUF for llama.cpp / ollama, ONNX Runtime GenAI)", "tokenizer": "tokenizer tools"}


def _attr(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def verb_path(argv: list[str]) -> str | None:
    """'quantize', 'export gguf', ...: the verb argv runs (the top-level parser has no valued options)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    return " ".join(words[:2]) if words[0] in GROUPS and len(words) > 1 else words[0]


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The `slm` parser; only `wanted`'s flags are generated (that imports its config's module)."""
    parser = argparse.ArgumentParser(prog="slm", description="slmkit: small language models on your CPU, offline.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups = {}
    for verb in VERBS:
        group, _, leaf = verb.name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=group + "_verb", metavar="ACTION", required=True)
        p = (groups[group] if group else sub).add_parser(
            leaf, help=verb.help, description=verb.description or verb.help,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(verb_name=verb.name)
        if verb.name == wanted:
            _add_settings(p, verb)
    return parser


def _add_settings(p: argparse.ArgumentParser, verb: Verb) -> None:
    job = _attr(verb.job)
    add_config_arguments(p, job, verb.positional)
    if verb.epilog:
        p.epilog = _attr(verb.epilog)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(verb_path(argv))
    args, extra = parser.parse_known_args(argv)
    _take_leftovers(parser, args, extra)
    verb = BY_NAME[args.verb_name]
    try:
        status = _attr(verb.run)(config_from_args(_attr(verb.job), args))
        return status if isinstance(status, int) and not isinstance(status, bool) else 0
    except SlmError as err:
        if args.debug:
            raise
        print(f"slm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _take_leftovers(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Positional items argparse left over (those after an option) join the trailing key=value
    items; an unknown option is refused, naming the closest one."""
    unknown = [e for e in extra if e.startswith("-") and e != "-"]
    if unknown:
        spec = getattr(args, SPEC, None)
        verb_parser = spec.parser if spec else parser
        options = [s for a in verb_parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(unknown[0].partition("=")[0], options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        verb_parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if extra:
        args.overrides = [*(getattr(args, "overrides", None) or []), *extra]


if __name__ == "__main__":
    sys.exit(main())

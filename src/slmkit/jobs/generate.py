"""`slm generate` and `slm chat` as configs: the runtime a model runs on (engine, precision), the
torch engine's decoding accelerations, the sampling settings, and the generator they build.

The terminal loop of `slm chat` stays in chat.py; this module only builds what it talks to."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.chat import run_chat as chat_loop
from slmkit.errors import SlmError
from slmkit.generate import TextGenerator
from slmkit.infer.constrain import OutputFormat
from slmkit.infer.engine import Engine
from slmkit.infer.executorch_runtime import ExecuTorchEngine, is_pte
from slmkit.infer.litert_runtime import LiteRTEngine, is_tflite
from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, runtime_files
from slmkit.infer.onnx_runtime import OnnxEngine, is_onnx_dir
from slmkit.infer.sampling import SamplingParams
from slmkit.infer.speculate import DraftModel, PromptLookup
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL
from slmkit.runtime import Decoding, Runtime, use_threads
from slmkit.tokenizer import Tokenizer, same_vocabulary
from slmkit.toolcalls import ToolError, ToolUse, read_tool_choice, read_tools


@dataclass
class GenerateJob:
    model: str = ""
    """GGUF file, Hugging Face directory, adapter directory or preset name (`slm presets`)"""
    prompt: str = ""
    """the prompt text, or - to read it from stdin"""
    chat: bool = False
    """wrap the prompt as a user message in the chat template"""
    system: str | None = None
    """system message (with chat)"""
    truncate: bool = False
    """keep the end of a prompt that is too long"""
    json: bool = False
    """structured output: answer with one JSON object (grammar by llguidance; the text always parses)"""
    json_schema: str | None = field(default=None, metadata={"metavar": "FILE|JSON"})
    """structured output: answer with JSON valid under this JSON Schema (a .json file or the schema inline)"""
    choices: list[str] = field(default_factory=list, metadata={"metavar": "A,B,..."})
    """structured output: answer with exactly one of these labels (classification)"""
    runtime: Runtime = field(default_factory=Runtime)
    decoding: Decoding = field(default_factory=Decoding)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128))


@dataclass
class ChatJob:
    model: str = DEFAULT_MODEL
    """GGUF file, Hugging Face directory, adapter directory or preset name; the default is the bundled SmolLM2-135M-Instruct"""
    system: str | None = None
    """system message for the conversation"""
    runtime: Runtime = field(default_factory=Runtime)
    decoding: Decoding = field(default_factory=Decoding)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    tools: str | None = None
    """a JSON file of tools the model may call (OpenAI's format: a list of {"type": "function", "function": {...}});
    calls are shown and /result TEXT answers them"""
    tool_choice: str = "auto"
    """auto (the model chooses), required (always a call), none, or a tool's name"""


def run_chat(job: ChatJob) -> int:
    tools = read_tool_file(job.tools, job.tool_choice) if job.tools else None  # refused before the model loads
    name, gen = load_generator(job.model, job.runtime, job.decoding)
    return chat_loop(gen, job.sampling, job.system, name=name, tools=tools)


def read_tool_file(path: str, choice: str = "auto") -> ToolUse:
    """Tools from a JSON file (a list, or {"tools": [...]}), checked; a one-line error naming the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SlmError(f"--tools {path}: cannot read it as JSON ({error})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    try:
        listed = read_tools(tools)
        named = {"type": "function", "function": {"name": choice}} if choice not in ("auto", "none", "required") else choice
        return ToolUse(listed, read_tool_choice(named, listed))
    except ToolError as error:
        raise SlmError(f"--tools {path}: {error}") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_generator(model: str, runtime: Runtime, decoding: Decoding | None = None) -> tuple[str, TextGenerator]:
    """(model name, TextGenerator) on the engine `runtime` asks for."""
    decoding = decoding or Decoding()
    use_threads(runtime.threads)
    speculate = speculate_spec(decoding.speculate)
    torch_only = [flag for flag, on in (("--compile", decoding.compile), ("--speculate", decoding.speculate)) if on]
    if is_onnx_dir(model) or is_pte(model) or is_tflite(model):  # an exported program runs on its own runtime
        if torch_only or runtime.engine != "auto":
            raise SlmError(f"'{model}' is an exported program; it runs on its own runtime only "
                           f"(drop {(torch_only or ['--engine ' + runtime.engine])[0]})")
        if is_pte(model) or is_tflite(model):
            engine = (ExecuTorchEngine if is_pte(model) else LiteRTEngine)(model, runtime.context, runtime.threads)
            return Path(model).name, TextGenerator(None, Tokenizer.from_dir(engine.tokenizer_dir), engine=engine)
        engine = OnnxEngine(model, runtime.context, runtime.threads)
        return Path(model).name, TextGenerator(None, Tokenizer.from_dir(model), engine=engine)
    if choose_engine(runtime.engine, model, torch_only) == "llamacpp":
        files = runtime_files(model, runtime.gguf_type, progress=_stderr)
        engine = LlamaCppEngine.for_files(files, runtime.context, threads=runtime.threads)
        return files.config.name or model, TextGenerator(None, files.tokenizer, engine=engine)
    dtype = getattr(torch, runtime.dtype)
    loaded = load(model, dtype=dtype, merge=True)
    drafter = _drafter(speculate, loaded, dtype, runtime.context)
    return loaded.source.config.name or model, TextGenerator(
        loaded.model, loaded.tokenizer, runtime.context, compile=decoding.compile, drafter=drafter,
        draft_tokens=decoding.draft_tokens)


def speculate_spec(spec: str | None) -> str | None:
    """'lookup', a draft model's name, or None; refused in one line before anything loads."""
    if spec is None or spec == "lookup":
        return spec
    if not spec.startswith("draft=") or not spec[len("draft="):]:
        raise SlmError(f"--speculate '{spec}': give 'lookup' or 'draft=MODEL' (a smaller model with the same tokenizer)")
    return spec[len("draft="):]


def _drafter(speculate: str | None, target, dtype, context: int | None):
    if speculate is None:
        return None
    if speculate == "lookup":
        return PromptLookup()
    draft = load(speculate, dtype=dtype, merge=True)
    if draft.tokenizer is None or target.tokenizer is None or not same_vocabulary(draft.tokenizer, target.tokenizer):
        raise SlmError(f"the draft model '{speculate}' has another tokenizer than the target; speculative decoding "
                       "needs the same vocabulary (draft with a model distilled from this one, or use --speculate lookup)")
    return DraftModel(Engine(draft.model, context))


def output_format(job: GenerateJob) -> OutputFormat | None:
    """The OutputFormat that json / json_schema / choices ask for (None for free text); bad input is
    refused here, before the model loads."""
    given = [name for name, on in (("--json", job.json), ("--json-schema", job.json_schema is not None),
                                   ("--choices", bool(job.choices))) if on]
    if len(given) > 1:
        raise SlmError(f"{given[1]} is not allowed with {given[0]}: give one structured-output setting")
    if job.choices:
        labels = tuple(c.strip() for c in job.choices if c.strip())
        if not labels:
            raise SlmError("--choices holds no label; give the answers to choose from, e.g. --choices yes,no")
        return OutputFormat("choices", choices=labels)
    if job.json:
        return OutputFormat("json_object")
    if job.json_schema is None:
        return None
    text = job.json_schema
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise SlmError(f"--json-schema '{text}' is neither a file nor an inline JSON object")
        text = Path(text).read_text()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise SlmError(f"--json-schema is not valid JSON ({error}); check its quoting") from None
    return OutputFormat("json_schema", schema=schema)


def run_generate(job: GenerateJob, out=None) -> int:
    """Stream the continuation of the prompt to `out` (default: stdout as it is now; the prompt first,
    unless chat); stats to stderr."""
    out = out or sys.stdout
    if not job.model or not job.prompt:
        raise SlmError("give a MODEL and a prompt (or - to read the prompt from stdin)")
    prompt = sys.stdin.read() if job.prompt == "-" else job.prompt
    fmt = output_format(job)
    _, gen = load_generator(job.model, job.runtime, job.decoding)
    if job.chat:
        messages = ([{"role": "system", "content": job.system}] if job.system else [])
        prompt = gen.tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    else:
        out.write(prompt)

    def show(_row: int, text: str) -> None:
        out.write(text)
        out.flush()

    result = gen.complete([prompt], job.sampling, show, truncate=job.truncate, output_format=fmt)[0]
    g = result.generation
    print(file=out)
    _stderr(f"[{result.prompt_tokens} prompt tokens in {g.prefill_seconds:.2f}s, {result.completion_tokens} new "
            f"at {g.decode_tokens_per_second:.1f} tokens/s{_kept(g)}, finish: {result.finish_reason}]")
    return 0


def _kept(g) -> str:
    """How many drafted tokens speculative decoding kept (empty when it did not speculate)."""
    return f", {g.accepted}/{g.drafted} drafted tokens kept" if g.drafted else ""

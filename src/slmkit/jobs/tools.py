"""The small verbs: `slm info`, `slm size`, `slm presets`, `slm tokenize`, `slm report`,
`slm plot`, `slm prepare`, `slm synth` and `slm tokenizer train` -- each a config and the
function that runs it (tables print through card.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.card import print_card, print_presets, print_size
from slmkit.data.prepare import PrepareConfig, prepare, split_documents
from slmkit.data.prepare import print_report as print_prepare_report
from slmkit.data.readers import expand_inputs, read_documents
from slmkit.data.synth import SynthConfig, synthesize
from slmkit.data.synth import print_report as print_synth_report
from slmkit.errors import SlmError
from slmkit.evals.report import write_report
from slmkit.load import inspect, load_tokenizer
from slmkit.presets import DEFAULT_MODEL
from slmkit.tokenizer import bytes_per_token, train_tokenizer
from slmkit.train.plot import plot_run


@dataclass
class InfoJob:
    model: str = DEFAULT_MODEL
    """GGUF file (or ollama:NAME[:TAG]), Hugging Face directory or preset name (`slm presets`); the default is the bundled SmolLM2-135M-Instruct; no weights are read"""


def run_info(job: InfoJob) -> None:
    print_card(inspect(job.model))


@dataclass
class PresetsJob:
    """`slm presets` has no settings."""


def run_presets(_job: PresetsJob) -> None:
    print_presets()


@dataclass
class SizeJob:
    model: str = ""
    """GGUF file, Hugging Face directory or preset name (`slm presets`); no weights are read"""
    bits: int = 16
    """bits per weight (4, 8, 16, 32)"""
    group_size: int = 32
    """weights per quantization scale (below 16 bits)"""
    context: int = 4096
    """tokens held in the KV cache"""
    batch: int = 1
    """sequences held in the KV cache"""
    kv_bits: int = 16
    """bits per KV-cache value"""


def run_size(job: SizeJob) -> None:
    if not job.model:
        raise SlmError("give a MODEL: a GGUF file, Hugging Face directory or preset name (`slm presets`)")
    print_size(inspect(job.model).config, job.bits, job.group_size, job.context, job.batch, job.kv_bits)


@dataclass
class TokenizeJob:
    model: str = DEFAULT_MODEL
    """the MODEL whose tokenizer to use (or a directory holding tokenizer.json)"""
    text: str = ""
    """the text to split, or - to read it from stdin"""
    special: bool = True
    """add the tokenizer's BOS/EOS as it does for a prompt"""
    chat: bool = False
    """wrap the text as a user message in the chat template first (what a chat prompt costs)"""
    json: bool = False
    """print the ids as a JSON list instead of a table"""


def run_tokenize(job: TokenizeJob) -> None:
    """Print each token's id and piece, and the count (a prompt's length and cost in tokens)."""
    if not job.text:
        raise SlmError("give the TEXT to split (or - to read it from stdin)")
    text = sys.stdin.read() if job.text == "-" else job.text
    tokenizer = load_tokenizer(job.model)
    if job.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    ids = tokenizer.encode(text, add_special=job.special)
    if job.json:
        print(json.dumps(ids))
        return
    for i in ids:
        print(f"{i:>8}  {tokenizer.decode([i], skip_special=False)!r}")
    print(f"{len(ids)} tokens, {len(text.encode())} bytes ({len(text.encode()) / max(len(ids), 1):.2f} bytes per token)")


@dataclass
class ReportJob:
    results: list[str] = field(default_factory=list)
    """JSON files or folders written by slm eval, slm bench or bench/quantize.py"""
    out: str = field(default="runs/report", metadata={"flag": ("-o", "--out")})
    """output folder (report.md and PNG plots)"""


def run_report(job: ReportJob) -> None:
    if not job.results:
        raise SlmError("give the results JSON files or folders to compare")
    print(f"wrote {write_report([Path(p) for p in job.results], Path(job.out))}")


@dataclass
class PlotJob:
    run: str = ""
    """run directory (holds metrics.jsonl)"""


def run_plot(job: PlotJob) -> None:
    if not job.run:
        raise SlmError("give the RUN directory to plot (it holds metrics.jsonl)")
    print(f"wrote {plot_run(job.run)}")


def run_prepare(cfg: PrepareConfig) -> None:
    print_prepare_report(prepare(cfg), cfg.out)


def run_synth(cfg: SynthConfig) -> None:
    print_synth_report(synthesize(cfg))


@dataclass
class TokenizerJob:
    inputs: list[str] = field(default_factory=list)
    """files, globs or directories of text"""
    out: str = ""
    """directory for tokenizer.json and tokenizer_config.json"""
    vocab_size: int = 8192
    """tokens in the vocabulary"""
    val_fraction: float = 0.1
    """documents held out to measure compression"""
    seed: int = 1234
    """seed of the held-out split"""
    text_field: str = "text"
    """field of .jsonl/.csv/.parquet records"""
    separator: str = "auto"
    """document separator in .txt files"""


def run_tokenizer(job: TokenizerJob, log=print) -> str:
    """Train, save and measure a tokenizer on held-out documents; returns the summary line."""
    if not job.inputs or not job.out:
        raise SlmError("give the text to train on and an output directory (INPUTS... --out DIR)")
    docs = [d for f in expand_inputs(job.inputs) for d in read_documents(f, job.text_field, job.separator)]
    if not docs:
        raise SlmError("the inputs hold no documents")
    train_ids, val_ids = split_documents(list(range(len(docs))), job.val_fraction, job.seed)
    tokenizer = train_tokenizer((docs[i] for i in train_ids), job.vocab_size)
    tokenizer.save(job.out)
    held_out = [docs[i] for i in val_ids] or docs
    summary = (f"wrote {job.out}/tokenizer.json: {tokenizer.vocab_size} tokens, "
               f"{bytes_per_token(tokenizer, held_out):.2f} bytes per token on {len(held_out)} held-out documents")
    log(summary)
    return summary

"""The small verbs' configs: `slm size`, `slm tokenizer train` and `slm demo` (and the tokenizer
training itself; size prints through card.py, and demo runs the demo pipeline recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmkit.data.prepare import split_documents
from slmkit.data.readers import expand_inputs, read_documents
from slmkit.errors import SlmError
from slmkit.tokenizer import bytes_per_token, train_tokenizer


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


@dataclass
class DemoJob:
    recipe: str = "configs/pipeline/demo.yaml"
    """the pipeline recipe `slm demo` runs (`make demo`: the bundled model fine-tuned, quantized, evaluated and exported in under 10 minutes)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""


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

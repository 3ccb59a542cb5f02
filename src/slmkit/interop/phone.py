"""What the one-file phone exports (OUT.pte for ExecuTorch, OUT.tflite for LiteRT) share: what a traced
program with a static cache cannot hold (refused before work), and the directory OUT_tokenizer/
beside the file, with tokenizer.json and tokenizer_config.json (the chat template) in the form the
runtimes' LLM runners read, plus config.json (our architecture) and the export's record, which `slm
generate/chat/bench OUT` read. The file is put in place last, so a file present is a finished export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.fileio import read_json, write_json
from slmkit.interop.hf import config_to_hf, read_hf_config
from slmkit.rope import rope_type

SUFFIX = "_tokenizer"
RECORD = "slmkit_export.json"


def sidecar_dir(path: str | Path) -> Path:
    """OUT_tokenizer/, beside OUT.<suffix>."""
    path = Path(path)
    return path.with_name(path.stem + SUFFIX)


def check_target(out: str | Path, suffix: str, force: bool, what: str) -> None:
    """Refusals that need no model: a name without the runtime's suffix, an existing output."""
    out = Path(out)
    if out.suffix != suffix:
        raise SlmError(f"'{out}': {what} is a {suffix} file; name the output OUT{suffix}")
    for path in (out, sidecar_dir(out)):
        if path.exists() and not force:
            raise SlmError(f"'{path}' exists; give --force to replace it")


def traced_refusal(config: ModelConfig, max_seq_len: int, min_seq_len: int = 2) -> str | None:
    """Why a static-cache program cannot be traced from this model, or None."""
    if config.num_local_experts:
        return ("mixture-of-experts layers route each token to experts chosen at run time (data-dependent shapes "
                "a static graph cannot hold)")
    if config.block_repeats != 1:
        return "shared blocks (one block applied several times) would share one static KV cache"
    if config.lowrank:
        return "factorized linears: densify them first (--densify)"
    original = (config.rope_scaling or {}).get("original_max_position_embeddings")
    if rope_type(config.rope_scaling) == "longrope" and max_seq_len > original:
        return (f"LongRoPE switches tables past {original} tokens during a sequence; export with "
                f"--max-seq-len {original} or less")
    if not min_seq_len <= max_seq_len <= config.max_position_embeddings:
        return f"--max-seq-len must be between {min_seq_len} and the model's context ({config.max_position_embeddings})"
    return None


def write_sidecar(side: Path, tokenizer, config: ModelConfig, record: dict) -> None:
    if tokenizer is None:
        raise SlmError("the model has no tokenizer; the runtime's runner needs one beside the file")
    tokenizer.save(side)
    write_json(side / "config.json", config_to_hf(config, torch.float32))
    write_json(side / RECORD, {**record, "exporter": "slmkit"})


def read_sidecar(path: str | Path, how: str) -> tuple[ModelConfig, dict, Path]:
    """(architecture, export record, directory) of an exported file; `how` names the verb that writes them."""
    side = sidecar_dir(path)
    record = read_json(side / RECORD)
    if record is None or not (side / "config.json").is_file():
        raise SlmError(f"'{path}' has no {side.name}/ beside it with config.json and {RECORD}: export it with "
                       f"`{how}` (which writes them)")
    return read_hf_config(side), record, side


def put_in_place(side: Path, file: Path, out: Path) -> None:
    """Move a finished export into place: the old file goes first, the directory next, the file last."""
    if out.exists():
        out.unlink()
    target = sidecar_dir(out)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(side, target)
    os.replace(file, out)

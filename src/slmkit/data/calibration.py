"""Calibration token windows for the calibrated compression methods (GPTQ, AWQ, Wanda, SparseGPT,
structured pruning, whitened SVD), read from text, from an `slm prepare` directory, or from a
built-in task's training conversations (`task:NAME`).

Calibrating on the task a model was fine-tuned for matters at 4 bits: GPTQ minimizes each layer's
output error on the calibration inputs, so it spends its error budget where the task's prompts
put their activations. Measured on a Symptom2Disease LoRA of SmolLM2 (int4 GPTQ g32, 96
validation rows): 76.0% calibrated on WikiText-2, 81.3% on the task's training chats, 83.3% in float.

The compression code takes token ids only (`slmkit.compress.calibrate`); reading and tokenizing the
calibration text lives here, in the data layer, so compression never imports the data pipeline.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from slmkit.data.loader import TokenStream
from slmkit.data.shared import shared_data_dir
from slmkit.data.tasks import TASK_SEED, task_data
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer, same_vocabulary

DEFAULT_CALIB = "corpus/wikitext2/valid.txt"  # the first part only; evaluation reads from the end
DEFAULT_CALIB_CHARS = 400_000
TASK_PREFIX = "task:"  # `task:symptom2disease`: the task's training conversations


def default_calib_file() -> Path:
    root = shared_data_dir()
    if root is None or not (root / DEFAULT_CALIB).is_file():
        raise SlmError("no calibration text: pass --calib FILE (plain text), or set SLMKIT_DATA_DIR to the "
                       "shared data directory holding corpus/wikitext2/valid.txt")
    return root / DEFAULT_CALIB


def calibration_ids(tokenizer: Tokenizer, file: str | Path | None, samples: int, seq_len: int,
                    vocab_size: int) -> torch.Tensor:
    """(samples, seq_len) token windows cut one after another from the start of the text.

    `file` is a plain-text file, a directory made by `slm prepare` (its train tokens are used,
    after checking they come from the model's tokenizer), or `task:NAME` (the built-in task's
    training conversations in a seeded order, rendered with the model's chat template -- never its
    validation or test rows); None reads the shared WikiText-2 text.
    """
    if isinstance(file, str) and file.startswith(TASK_PREFIX):
        path = Path(file)
        ids = tokenizer.encode(task_chats(tokenizer, file[len(TASK_PREFIX):]), add_special=False)
        return _windows(ids, path, samples, seq_len, vocab_size)
    path = Path(file) if file else default_calib_file()
    if path.is_dir():
        ids = _prepared_ids(path, tokenizer, samples * seq_len)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")[: DEFAULT_CALIB_CHARS if file is None else None]
        if not text.strip():
            raise SlmError(f"calibration file '{path}' is empty; give a plain-text file of a few hundred KB")
        ids = tokenizer.encode(text, add_special=False)
    else:
        raise SlmError(f"calibration file '{path}' not found (or name a built-in task: {TASK_PREFIX}symptom2disease)")
    return _windows(ids, path, samples, seq_len, vocab_size)


def check_calibration(file: str | Path | None) -> None:
    """The calibration source exists (a task by its name, a file or directory by its path), before any work."""
    if isinstance(file, str) and file.startswith(TASK_PREFIX):
        task_data(file[len(TASK_PREFIX):])  # an unknown task or missing task data fails here, in one line
    elif file and not Path(file).exists():
        raise SlmError(f"calibration file '{file}' not found (or name a built-in task: {TASK_PREFIX}symptom2disease)")
    elif not file:
        default_calib_file()


def task_chats(tokenizer: Tokenizer, name: str) -> str:
    """The task's training conversations, shuffled with a fixed seed (the files group rows by label,
    and the windows are cut from the start), each rendered whole by the model's chat template."""
    if not tokenizer.chat_template:
        raise SlmError(f"calibrating on {TASK_PREFIX}{name} renders its conversations with the model's chat "
                       "template, and this model has none; pass --calib FILE (plain text)")
    train = list(task_data(name).train)
    random.Random(f"{TASK_SEED}:calibration:{name}").shuffle(train)
    return "".join(tokenizer.apply_chat_template(e.messages, add_generation_prompt=False) for e in train)


def _windows(ids: list[int], path: Path, samples: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    if max(ids) >= vocab_size:
        raise SlmError(f"the calibration text tokenizes to ids up to {max(ids)}, but the model has {vocab_size} "
                       "embeddings: the tokenizer is not the model's")
    needed = samples * seq_len
    if len(ids) < seq_len:
        raise SlmError(f"calibration file '{path}' has {len(ids)} tokens, fewer than one window of {seq_len}; "
                       "give more text or a smaller --calib-seq-len")
    usable = min(needed, len(ids) // seq_len * seq_len)
    return torch.tensor(ids[:usable]).reshape(-1, seq_len)


def _prepared_ids(path: Path, tokenizer: Tokenizer, needed: int) -> list[int]:
    if not (path / "meta.json").is_file():
        raise SlmError(f"'{path}' is a directory but not one made by `slm prepare` (no meta.json); "
                       "give a text file or a prepared directory")
    if (path / "tokenizer.json").is_file():
        theirs = Tokenizer.from_dir(path)
        if not same_vocabulary(theirs, tokenizer):
            raise SlmError(f"the calibration data in '{path}' was tokenized with a different tokenizer "
                           f"({theirs.vocab_size} tokens) than the model's ({tokenizer.vocab_size}); prepare it with "
                           "`slm prepare ... --tokenizer MODEL` or pass a plain-text file")
    stream = TokenStream(path, "train")
    if not stream.size:
        raise SlmError(f"the prepared directory '{path}' has no training tokens")
    return stream.read(0, min(needed, stream.size)).astype("int64").tolist()

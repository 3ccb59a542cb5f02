"""Calibration token windows for the calibrated compression methods (GPTQ, AWQ, Wanda, SparseGPT,
structured pruning, whitened SVD), read from text or from an `slm prepare` directory.

The compression code takes token ids only (`slmkit.compress.calibrate`); reading and tokenizing the
calibration text lives here, in the data layer, so compression never imports the data pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.data.loader import TokenStream
from slmkit.data.shared import shared_data_dir
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer, same_vocabulary

DEFAULT_CALIB = "corpus/wikitext2/valid.txt"  # the first part only; evaluation reads from the end
DEFAULT_CALIB_CHARS = 400_000


def default_calib_file() -> Path:
    root = shared_data_dir()
    if root is None or not (root / DEFAULT_CALIB).is_file():
        raise SlmError("no calibration text: pass --calib FILE (plain text), or set SLMKIT_DATA_DIR to the "
                       "shared data directory holding corpus/wikitext2/valid.txt")
    return root / DEFAULT_CALIB


def calibration_ids(tokenizer: Tokenizer, file: str | Path | None, samples: int, seq_len: int,
                    vocab_size: int) -> torch.Tensor:
    """(samples, seq_len) token windows cut one after another from the start of the text.

    `file` is a plain-text file, or a directory made by `slm prepare` (its train tokens are used,
    after checking they come from the model's tokenizer); None reads the shared WikiText-2 text.
    """
    path = Path(file) if file else default_calib_file()
    if path.is_dir():
        ids = _prepared_ids(path, tokenizer, samples * seq_len)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")[: DEFAULT_CALIB_CHARS if file is None else None]
        if not text.strip():
            raise SlmError(f"calibration file '{path}' is empty; give a plain-text file of a few hundred KB")
        ids = tokenizer.encode(text, add_special=False)
    else:
        raise SlmError(f"calibration file '{path}' not found")
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

"""Calibration text for GPTQ/AWQ, and running a model one block at a time over it.

Calibrated methods quantize block by block: the inputs of block i are the outputs of blocks
0..i-1 *after* they were quantized, so later blocks learn to correct earlier errors. `BlockInputs`
holds those activations for all samples, (n, T, C) in fp32, and advances them through a block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.data.shared import shared_data_dir
from slmkit.errors import SlmError
from slmkit.model import CausalLM, attention_mask, rope_cos_sin
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
    from slmkit.data.loader import TokenStream

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


class BlockInputs:
    """The hidden states entering the current block, for every calibration sample."""

    def __init__(self, model: CausalLM, ids: torch.Tensor, micro_batch: int = 8):
        self.model, self.micro_batch = model, micro_batch
        n, t = ids.shape
        with torch.no_grad():
            self.x = torch.cat([model.model.embed_tokens(ids[i : i + micro_batch]).float()
                                for i in range(0, n, micro_batch)])  # (n, T, C)
        positions = torch.arange(t).expand(1, t)
        self.cos, self.sin = rope_cos_sin(model.inv_freq, positions, torch.float32)
        self.mask, self.is_causal = attention_mask(0, t, None, model.config.sliding_window)

    @property
    def tokens(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    @torch.no_grad()
    def run(self, block: torch.nn.Module, advance: bool) -> None:
        """Forward every sample through `block` (hooks see its inputs); keep the outputs if `advance`."""
        outputs = []
        for i in range(0, self.x.shape[0], self.micro_batch):
            y = block(self.x[i : i + self.micro_batch], self.cos, self.sin, self.mask, self.is_causal)
            if advance:
                outputs.append(y)
        if advance:
            self.x = torch.cat(outputs)

    @torch.no_grad()
    def final_norm(self) -> torch.Tensor:
        """Inputs of the output head, (n*T, C)."""
        return self.model.model.norm(self.x).reshape(-1, self.x.shape[-1])

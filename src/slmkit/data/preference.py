"""Preference pairs for DPO / ORPO, in TRL's formats, encoded as `slm finetune` encodes its rows.

One JSON object per line:
    standard        {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational  {"prompt": [messages...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    implicit prompt {"chosen": [whole conversation], "rejected": [whole conversation]}: the prompt is
                    the turns both share, as TRL's `extract_prompt` takes it
Each side becomes an `Example` (a chat ending in the answer, or prompt + completion), so its
tokens and its answer-only mask are exactly those of supervised fine-tuning (`data.sft.encode`).
A side longer than the sequence loses the middle of its prompt (counted) or is refused
(`overlong=error`); a pair is never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.data.readers import json_records
from slmkit.data.sft import Encoded, Example, check_messages, encode, fit
from slmkit.data.sft_batches import example_row, pad_rows
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    where: str


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file, checked; an error names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"preference data '{path}' not found")
    if path.suffix != ".jsonl":
        raise SlmError(f"'{path}' is not .jsonl; write one {{prompt, chosen, rejected}} object per line")
    pairs, form = [], None
    for where, row in json_records(path):
        kind = _form(row, where)
        if form is not None and kind != form:
            raise SlmError(f"{where}: a {kind} row in a file of {form} rows; use one format per file")
        form = kind
        pairs.append(_pair(row, kind, where))
    if not pairs:
        raise SlmError(f"'{path}' holds no preference pairs")
    return pairs


def _form(row: dict, where: str) -> str:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise SlmError(f"{where}: missing '{key}' (a preference row has prompt, chosen and rejected)")
    if "prompt" not in row:
        if not isinstance(row["chosen"], list):
            raise SlmError(f"{where}: missing 'prompt' (only conversations may leave it implicit)")
        return "implicit"
    return "conversational" if isinstance(row["prompt"], list) else "standard"


def _pair(row: dict, kind: str, where: str) -> PreferencePair:
    if kind == "standard":
        prompt, chosen, rejected = (_text(row, k, where) for k in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise SlmError(f"{where}: 'chosen' equals 'rejected'; a pair must prefer one answer to another")
        return PreferencePair(Example(prompt=prompt, completion=chosen, where=where),
                              Example(prompt=prompt, completion=rejected, where=where), where)
    if kind == "conversational":
        prompt = check_messages(row["prompt"], f"{where}: prompt")
        chosen, rejected = (check_messages(row[k], f"{where}: {k}") for k in ("chosen", "rejected"))
    else:
        whole_c, whole_r = (check_messages(row[k], f"{where}: {k}") for k in ("chosen", "rejected"))
        shared = 0
        while shared < min(len(whole_c), len(whole_r)) - 1 and whole_c[shared] == whole_r[shared]:
            shared += 1
        prompt, chosen, rejected = whole_c[:shared], whole_c[shared:], whole_r[shared:]
    if not prompt or prompt[-1]["role"] != "user":
        raise SlmError(f"{where}: the prompt must end with a user turn")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or any(m["role"] != "assistant" for m in turns) or not any(m["content"].strip() for m in turns):
            raise SlmError(f"{where}: '{key}' must be the assistant's non-empty answer")
    if chosen == rejected:
        raise SlmError(f"{where}: 'chosen' equals 'rejected'; a pair must prefer one answer to another")
    return PreferencePair(Example(messages=prompt + chosen, where=where),
                          Example(messages=prompt + rejected, where=where), where)


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise SlmError(f"{where}: '{key}' must be non-empty text, got {value!r:.60}")
    return value


@dataclass
class PairReport:
    pairs: int = 0
    truncated: int = 0
    tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        cut = f", {self.truncated} cut to fit (the middle of their prompts)" if self.truncated else ""
        return f"{self.pairs} pairs, {self.tokens:,} tokens, longest side {self.longest}{cut}"


def encode_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, limit: int,
                 overlong: str = "truncate") -> tuple[list[EncodedPair], PairReport]:
    """Both sides of every pair as token ids with their answer masks, each fitted to `limit` tokens."""
    out, report = [], PairReport()
    for pair in pairs:
        sides = []
        for example in (pair.chosen, pair.rejected):
            encoded = encode(example, tokenizer)
            report.longest = max(report.longest, len(encoded.ids))
            fitted = fit(encoded, limit, overlong, pair.where)
            if fitted is None:
                raise SlmError(f"{pair.where}: an answer alone is longer than the {limit}-token sequence; raise "
                               "train.seq_len or shorten it")
            sides.append(fitted)
        encoded_pair = EncodedPair(*sides)
        report.pairs += 1
        report.truncated += encoded_pair.truncated
        report.tokens += len(sides[0].ids) + len(sides[1].ids)
        out.append(encoded_pair)
    return out, report


class PreferenceBatches:
    """The loop's batches of pairs: a micro batch of m pairs is 2m right-padded rows, the m chosen
    sides then the m rejected ones (one forward pass scores both): input_ids, targets (the answer's
    tokens, IGNORE elsewhere), all_targets (every real token's next token), and each side's reference
    log-probability (`ref_logps`, (2m,)) once `reference` holds them. Pairs are drawn epoch by
    epoch in a seeded order, so a resumed run sees the same batches."""

    def __init__(self, pairs: list[EncodedPair], layout, seed: int, pad_id: int = 0):
        if not pairs:
            raise SlmError("no preference pairs to train on")
        self.pairs, self.layout, self.seed, self.pad_id = pairs, layout, seed, pad_id
        self.reference: torch.Tensor | None = None  # (len(pairs), 2): chosen, rejected log-probabilities

    @property
    def rows_per_epoch(self) -> int:
        return len(self.pairs)

    def pair_index(self, p: int) -> int:
        epoch, p = divmod(p, len(self.pairs))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pairs), generator=gen)[p].item()

    def batch(self, step: int, micro: int, rank: int = 0) -> dict[str, torch.Tensor]:
        m, world = self.layout.micro_batch, self.layout.world
        first = step * self.layout.global_batch + micro * world * m + rank * m
        return self.rows([self.pair_index(p) for p in range(first, first + m)])

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pairs `indices` as one batch (chosen rows first)."""
        sides = [self.pairs[i].chosen for i in indices] + [self.pairs[i].rejected for i in indices]
        batch = pad_rows([example_row(e) for e in sides], self.pad_id)
        # every real token's next-token target, the prompt's included (ORPO's NLL covers them, as in TRL)
        batch["all_targets"] = pad_rows([(e.ids[:-1], e.ids[1:]) for e in sides], self.pad_id)["targets"]
        if self.reference is not None:
            ref = self.reference[indices]  # (m, 2)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def all_batches(self, size: int) -> list[list[int]]:
        """Every pair once, in order, `size` at a time (reference log-probabilities, validation)."""
        return [list(range(i, min(i + size, len(self.pairs)))) for i in range(0, len(self.pairs), size)]

"""`slm prepare`: raw text -> filtered, de-duplicated, split, tokenized, packed token shards.

Output directory:
    meta.json                  what was read, what each filter and de-duplication removed, counts
    tokenizer.json (+ config)  the tokenizer the shards were made with (training reads it from here)
    train-00000.bin ...        uint16 (vocab <= 65536) or uint32 token ids, documents separated
    val-00000.bin ...          by one separator token (default <|endoftext|>)

Documents go to train or validation whole (seeded shuffle), so no text is in both. The run is
keyed by a fingerprint of the inputs' bytes, the tokenizer and the settings: re-running on
unchanged input does nothing. The new directory is built beside the old and swapped in at the end.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from slmkit.config import to_dict
from slmkit.data.dedup import DedupReport, exact_dedup, near_dedup
from slmkit.data.filters import FilterConfig, first_failure
from slmkit.data.readers import expand_inputs, read_documents
from slmkit.data.shards import FORMAT, read_meta
from slmkit.errors import SlmError
from slmkit.fileio import file_sha256, partial_dir, replace_dir
from slmkit.load import load_tokenizer
from slmkit.presets import DEFAULT_MODEL
from slmkit.tokenizer import Tokenizer


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Files, globs or directories to read (.txt, .jsonl, .csv, .parquet)."""
    out: str = "data/prepared"
    """Output directory for the shards and meta.json."""
    tokenizer: str = DEFAULT_MODEL
    """A tokenizer.json directory (e.g. from `slm tokenizer train`) or a model whose tokenizer to use."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.csv/.parquet records."""
    separator: str = "auto"
    """Document separator in .txt files: auto (<|endoftext|> if present, else blank lines) or a string."""
    doc_separator_token: str = "<|endoftext|>"
    """Token appended after every document in the shards (falls back to the tokenizer's EOS)."""
    val_fraction: float = 0.1
    """Share of documents held out for validation."""
    seed: int = 1234
    """Seed of the train/validation split."""
    exact_dedup: bool = True
    """Drop documents whose normalised text repeats an earlier one."""
    near_dedup: bool = True
    """Drop near duplicates (MinHash LSH over word 5-grams)."""
    near_threshold: float = 0.8
    """Estimated Jaccard similarity at which two documents count as near duplicates."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file."""
    filters: FilterConfig = field(default_factory=FilterConfig)


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run the preparation (or nothing, if the output is up to date); returns meta.json's content."""
    _check(cfg)
    files = expand_inputs(cfg.inputs)
    tokenizer = _load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, files, tokenizer)
    existing = read_meta(out) if (out / "meta.json").is_file() else None
    if existing and existing.get("fingerprint") == fingerprint and _shards_intact(out, existing):
        log(f"{out} is up to date with its inputs; nothing to do")
        return existing

    docs, sources = _read_all(files, cfg)
    sep_id = _separator_id(tokenizer, cfg.doc_separator_token)
    kept, filter_report = _filter(docs, cfg.filters, tokenizer)
    dedup = DedupReport()
    if cfg.exact_dedup:
        kept = [kept[i] for i in exact_dedup([docs[i] for i in kept], dedup)]
    if cfg.near_dedup and kept:
        kept = near_dedup(docs, kept, dedup, cfg.near_threshold)
    if not kept:
        raise SlmError("every document was filtered out; loosen the filters (see `slm prepare --help`)")
    train_ids, val_ids = split_documents(kept, cfg.val_fraction, cfg.seed)

    tmp = partial_dir(out)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    counts, shards = {}, {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        tokens = _tokenize([docs[i] for i in ids], tokenizer, sep_id, split)
        counts[split] = int(tokens.size)
        shards[split] = _write_shards(tmp, split, tokens.astype(dtype), cfg.shard_tokens)
    tokenizer.save(tmp)
    meta = {
        "format": FORMAT, "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"source": cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                      "separator_token": tokenizer.token(sep_id), "separator_id": sep_id},
        "sources": sources,
        "documents": {"read": len(docs), "kept": len(kept), "train": len(train_ids), "val": len(val_ids)},
        "tokens": counts, "filters": filter_report,
        "dedup": {"exact_removed": dedup.exact_removed, "near_removed": dedup.near_removed,
                  "near_clusters": dedup.near_clusters, "examples": dedup.examples},
        "shards": shards, "config": to_dict(cfg),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    replace_dir(tmp, out)
    return meta


def split_documents(ids: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle, then the first share to validation; every document lands in exactly one split."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) > 1:
        n_val = min(max(n_val, 1), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


# -- steps -------------------------------------------------------------------------------------


def _check(cfg: PrepareConfig) -> None:
    if not cfg.inputs:
        raise SlmError("no inputs: give files, globs or directories to read")
    if not 0 <= cfg.val_fraction < 1:
        raise SlmError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if not 0 < cfg.near_threshold <= 1:
        raise SlmError(f"near_threshold must be in (0, 1], got {cfg.near_threshold}")


def _load_tokenizer(spec: str) -> Tokenizer:
    return load_tokenizer(spec)


def _separator_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.backend.token_to_id(token) if token else None
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        raise SlmError(f"the tokenizer has no '{token}' and no EOS token to separate documents; "
                       "set doc_separator_token to a token it has")
    return found


def _fingerprint(cfg: PrepareConfig, files: list[Path], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "inputs")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer.backend.to_str().encode())
    for f in files:
        digest.update(str(f.resolve()).encode())
        digest.update(_file_sha256(f).encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as err:
        raise SlmError(f"cannot read '{path}': {err.strerror or err}") from err


def _read_all(files: list[Path], cfg: PrepareConfig) -> tuple[list[str], list[dict]]:
    docs, sources = [], []
    for f in tqdm(files, desc="reading", unit="file", disable=len(files) < 2):
        before = len(docs)
        docs += read_documents(f, cfg.text_field, cfg.separator)
        sources.append({"path": str(f), "bytes": f.stat().st_size, "documents": len(docs) - before})
    if not docs:
        raise SlmError(f"the inputs hold no documents ({', '.join(map(str, files))} are empty)")
    return docs, sources


def _filter(docs: list[str], cfg: FilterConfig, tokenizer: Tokenizer) -> tuple[list[int], dict]:
    kept, dropped = [], {}
    for i, doc in enumerate(tqdm(docs, desc="filtering", unit="doc", mininterval=1.0)):
        reason = first_failure(doc, cfg)
        if reason is None:
            kept.append(i)
        else:
            dropped.setdefault(reason, []).append(i)
    report = {}
    for reason, ids in dropped.items():
        tokens = sum(len(e.ids) for e in tokenizer.backend.encode_batch([docs[i] for i in ids]))
        report[reason] = {"documents": len(ids), "tokens": tokens}
    return kept, report


def _tokenize(texts: list[str], tokenizer: Tokenizer, sep_id: int, split: str) -> np.ndarray:
    """All documents of a split, each followed by the separator token (tokenized on all cores)."""
    pieces, chunk = [], 1024
    for start in tqdm(range(0, len(texts), chunk), desc=f"tokenizing {split}", unit="chunk",
                      disable=len(texts) <= chunk):
        for enc in tokenizer.backend.encode_batch(texts[start:start + chunk], add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=np.int64))
            pieces.append(np.asarray([sep_id], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _write_shards(directory: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[str]:
    names = []
    for index, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        name = f"{split}-{index:05d}.bin"
        tokens[start:start + shard_tokens].tofile(directory / name)
        names.append(name)
    return names


def _shards_intact(out: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, names in meta.get("shards", {}).items():
        sizes = [(out / n).stat().st_size if (out / n).is_file() else -1 for n in names]
        if min(sizes, default=0) < 0 or sum(sizes) != meta["tokens"][split] * itemsize:
            return False
    return True


def print_report(meta: dict, out: str) -> None:
    """What `slm prepare` kept and removed, as a table."""
    table = Table(title=f"prepared {out}", title_justify="left")
    for col in ("step", "documents", "tokens"):
        table.add_column(col, justify="left" if col == "step" else "right")
    docs = meta["documents"]
    table.add_row("read", f"{docs['read']:,}", "")
    for name, dropped in meta["filters"].items():
        table.add_row(f"filter {name}", f"-{dropped['documents']:,}", f"-{dropped['tokens']:,}")
    dedup = meta["dedup"]
    table.add_row("exact duplicates", f"-{dedup['exact_removed']:,}", "")
    table.add_row(f"near duplicates ({dedup['near_clusters']} clusters)", f"-{dedup['near_removed']:,}", "")
    table.add_row("train", f"{docs['train']:,}", f"{meta['tokens']['train']:,}")
    table.add_row("validation", f"{docs['val']:,}", f"{meta['tokens']['val']:,}")
    Console(highlight=False).print(table)

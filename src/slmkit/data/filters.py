"""Document quality filters (heuristics in the spirit of Gopher / C4 / FineWeb).

Each filter is a named test with a configurable threshold; `first_failure` returns the name of
the first one a document fails, so a report can count what each filter removed. Thresholds of 0
(or None for the upper bounds) switch a filter off.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class FilterConfig:
    min_chars: int = 64
    """Drop documents shorter than this many characters (0 = no lower bound)."""
    max_chars: int = 200_000
    """Drop documents longer than this many characters (0 = no upper bound)."""
    min_mean_word_length: float = 2.5
    """Drop documents whose words average fewer characters (lists of numbers, noise)."""
    max_mean_word_length: float = 12.0
    """Drop documents whose words average more characters (URLs, hashes, glued text)."""
    max_symbol_ratio: float = 0.3
    """Drop documents where this share of non-space characters is neither a letter nor a digit."""
    max_repeated_line_ratio: float = 0.3
    """Drop documents where this share of lines repeats an earlier line."""
    max_repeated_ngram_ratio: float = 0.3
    """Drop documents where this share of characters lies in word n-grams that occur more than once."""
    ngram_size: int = 5
    """n of the repeated n-gram filter."""
    max_non_printable_ratio: float = 0.01
    """Drop documents with more than this share of control / non-printable characters."""


def mean_word_length(words: list[str]) -> float:
    return sum(map(len, words)) / len(words) if words else 0.0


def symbol_ratio(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(not c.isalnum() for c in visible) / len(visible) if visible else 1.0


def repeated_line_ratio(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_ratio(words: list[str], n: int) -> float:
    """Share of word characters covered by n-grams that occur more than once (Gopher's
    "duplicate n-gram character fraction")."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def non_printable_ratio(text: str) -> float:
    bad = sum(not c.isprintable() and c not in "\n\t\r" for c in text)
    return bad / len(text) if text else 0.0


def first_failure(text: str, cfg: FilterConfig) -> str | None:
    """Name of the first filter `text` fails, or None when it passes all."""
    if cfg.min_chars and len(text) < cfg.min_chars:
        return "min_chars"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "max_chars"
    if cfg.max_non_printable_ratio and non_printable_ratio(text) > cfg.max_non_printable_ratio:
        return "non_printable"
    words = text.split()
    mean = mean_word_length(words)
    if cfg.min_mean_word_length and mean < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if cfg.max_mean_word_length and mean > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if cfg.max_symbol_ratio and symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if cfg.max_repeated_line_ratio and repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "repeated_lines"
    if cfg.max_repeated_ngram_ratio and repeated_ngram_ratio(words, cfg.ngram_size) > cfg.max_repeated_ngram_ratio:
        return "repeated_ngrams"
    return None

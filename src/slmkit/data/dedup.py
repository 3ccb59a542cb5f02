"""Exact and near de-duplication of documents.

Exact: a hash of the text with case and whitespace normalised. Near: MinHash signatures of word
5-gram shingles, indexed with `datasketch`'s LSH; a document whose estimated Jaccard similarity to
an already kept one reaches the threshold joins that one's cluster and is dropped. The first
document of every cluster is kept, so the result does not depend on anything but input order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class DedupReport:
    exact_removed: int = 0
    near_removed: int = 0
    near_clusters: int = 0  # kept documents that had at least one near duplicate removed
    examples: list[tuple[str, str]] = field(default_factory=list)  # (kept, removed) openings


def normalized_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def exact_dedup(docs: list[str], report: DedupReport) -> list[int]:
    """Indices of the documents to keep (first occurrence of each normalised text)."""
    seen: set[str] = set()
    keep = []
    for i, doc in enumerate(docs):
        key = normalized_hash(doc)
        if key in seen:
            report.exact_removed += 1
        else:
            seen.add(key)
            keep.append(i)
    return keep


def _shingles(text: str, n: int = 5) -> list[bytes]:
    words = text.lower().split()
    if len(words) < n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def near_dedup(docs: list[str], indices: list[int], report: DedupReport, threshold: float = 0.8,
               num_perm: int = 128, seed: int = 1) -> list[int]:
    """Of `indices`, those whose documents have no earlier near duplicate (MinHash LSH)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    clusters: set[int] = set()
    keep = []
    hashes = MinHash.bulk([_shingles(docs[i]) for i in indices], num_perm=num_perm, seed=seed)
    for i, signature in zip(indices, hashes):
        matches = lsh.query(signature)
        if matches:
            report.near_removed += 1
            first = min(matches)
            clusters.add(first)
            if len(report.examples) < 3:
                report.examples.append((docs[first][:80], docs[i][:80]))
            continue
        lsh.insert(i, signature)
        keep.append(i)
    report.near_clusters = len(clusters)
    return keep

"""What a stage directory remembers: the fingerprint of its inputs, and whether it finished.

runs/<pipeline>/NN-stage/
    fingerprint.json   written when the stage starts: {fingerprint, config}; a rerun with the same
                       fingerprint continues the work in place (a training stage resumes from its
                       last checkpoint), a different one clears the directory first
    stage.json         written (atomically) when the stage has finished: fingerprint, wall time,
                       outputs. A stage whose stage.json holds the current fingerprint is skipped.

A fingerprint hashes the stage's resolved config, the fingerprints of the stages it reads from, and
the content of every file the config names that lives outside the run directory (the base model,
a training file), so an edited input reruns the stage even when the recipe did not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.fileio import file_sha256, read_json, write_json
from slmkit.load import resolve

STARTED, FINISHED = "fingerprint.json", "stage.json"


def fingerprint(kind: str, config: dict, upstream: list[str], run_root: Path) -> str:
    """sha256 of the stage kind, its config, its upstream fingerprints and its outside input files."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"kind": kind, "config": config, "upstream": upstream}, sort_keys=True,
                             default=str).encode())
    for path in sorted(_outside_files(config, run_root.resolve())):
        digest.update(f"{path}\0{_content_hash(path)}\n".encode())
    return digest.hexdigest()


def _outside_files(value: Any, run_root: Path) -> set[Path]:
    """Existing files and model directories named anywhere in the config, outside the run directory
    (inside it they belong to an upstream stage, whose fingerprint already covers them)."""
    if isinstance(value, dict):
        return set().union(*(_outside_files(v, run_root) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_outside_files(v, run_root) for v in value)) if value else set()
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 1024:
        return set()  # not a path (a recipe's text, a prompt)
    target = resolve_quietly(value)
    if target is None or run_root in target.parents or target == run_root:
        return set()
    return {target}


def resolve_quietly(value: str) -> Path | None:
    """The file or directory a config string names (a model name resolves to its file), else None."""
    path = Path(value)
    try:
        if path.exists():
            return path.resolve()
    except OSError:  # a name too long for the file system: not a path
        return None
    try:
        target = resolve(value)
    except Exception:  # not a model name either: a plain setting such as "lora" or "cosine"
        return None
    return target.resolve() if isinstance(target, Path) else None


def _content_hash(path: Path) -> str:
    """A file's sha256; a directory's: the names and hashes of the files directly in it (a model
    directory, a data directory's shards), large files included -- reading 300 MB takes ~0.3 s."""
    if path.is_file():
        return _file_hash(path, *_stamp(path))
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{f.name}\0{_file_hash(f, *_stamp(f))}\n".encode())
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_hash(path: Path, _size: int, _mtime_ns: int) -> str:
    """Hashed once per process while the file's size and mtime stay the same (a plan and its run
    fingerprint the same base model several times)."""
    return file_sha256(path)


@dataclass
class StageDir:
    path: Path

    def finished(self) -> dict | None:
        """The finished record, or None when the stage has not completed here."""
        return read_json(self.path / FINISHED)

    def is_done(self, fp: str) -> bool:
        record = self.finished()
        return record is not None and record.get("fingerprint") == fp

    def begin(self, fp: str, config: dict) -> bool:
        """Prepare the directory for work on `fp`; True when it holds unfinished work of the same
        fingerprint (a killed run), which a training stage continues."""
        started = read_json(self.path / STARTED)
        if started is not None and started.get("fingerprint") == fp and self.finished() is None:
            return True
        self.restart(fp, config)
        return False

    def restart(self, fp: str, config: dict) -> None:
        """An empty directory marked as started on `fp` (whatever was there is removed)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_json(self.path / STARTED, {"fingerprint": fp, "config": config})

    def started(self) -> dict | None:
        return read_json(self.path / STARTED)

    def finish(self, fp: str, record: dict) -> None:
        write_json(self.path / FINISHED, {"fingerprint": fp, **record})

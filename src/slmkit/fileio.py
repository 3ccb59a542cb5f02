"""Writing files and directories so that a crash never leaves half of one under the real name.

`atomic_write` writes a file through a temporary name and renames it (`write_text`, `write_json`
and `write_yaml` for text); a directory is built in `partial_dir(path)` and moved into place by
`replace_dir` (an older one there is swapped out at the very end); `point` moves a symlink in one
rename. Everything slmkit saves goes through these. Files written inside a partial directory need
nothing more (the directory appears whole or not at all), and an append-only log (a training run's
metrics.jsonl) gains whole lines and is trimmed with `write_text` on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml


def atomic_write(file: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) for a temporary name beside `file`, then rename it to `file`."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    os.replace(tmp, file)


def write_text(file: Path, text: str) -> None:
    atomic_write(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(file: Path, data) -> None:
    write_text(file, json.dumps(data, indent=2) + "\n")


def write_yaml(file: Path, data) -> None:
    write_text(file, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def point(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, replacing an old link in one rename."""
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def read_json(file: Path):
    """The JSON in `file`, or None when it is missing or half-written (a record of work not finished)."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def partial_dir(path: Path) -> Path:
    """An empty PATH.partial directory to build `path` in (a leftover of a crashed run is removed)."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def replace_dir(partial: Path, path: Path) -> Path:
    """Move the finished directory `partial` to `path`, replacing what was there only at the end."""
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        partial.rename(path)
        shutil.rmtree(old)
    else:
        partial.rename(path)
    return path


def dir_bytes(path: Path) -> int:
    """Size on disk of the files directly in a directory (an exported model and its side files)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def file_sha256(path: Path) -> str:
    """Content hash of one file, read in 1 MiB blocks (model files are hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Writing files and directories so that a crash never leaves half of one under the real name.

`atomic_write` writes a file through a temporary name and renames it; `write_json` does that for
JSON; `replace_dir` moves a finished directory into place (an older one there is swapped out at
the very end). Everything that slmkit saves goes through these three.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(file: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) for a temporary name beside `file`, then rename it to `file`."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    os.replace(tmp, file)


def write_json(file: Path, data) -> None:
    atomic_write(file, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(file: Path):
    """The JSON in `file`, or None when it is missing or half-written (a record of work not finished)."""
    try:
        return json.loads(Path(file).read_text())
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


def file_sha256(path: Path) -> str:
    """Content hash of one file, read in 1 MiB blocks (model files are hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

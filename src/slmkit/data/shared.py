"""Where the shared data sets live: $SLMKIT_DATA_DIR, else `../shared/data` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """The shared data directory, or None when there is none (demos then skip their data steps)."""
    candidates = [os.environ.get("SLMKIT_DATA_DIR"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None

"""The packed-shard directory that `slm prepare` writes and training reads: its format tag and meta.json.

Shared by the writer (`data.prepare`) and the reader (`data.loader`), so that reading shards does
not depend on the code that makes them (filters, de-duplication, a MODEL's tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.errors import SlmError

FORMAT = "slmkit-tokens-v1"


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SlmError(f"'{path / 'meta.json'}' is missing or corrupt ({err}); run `slm prepare` again") from err
    if meta.get("format") != FORMAT:
        raise SlmError(f"'{path}' was not written by `slm prepare` (format {meta.get('format')!r})")
    return meta

"""The one exception users see.

`SlmError` carries a message written for the person at the terminal: what is wrong and how to fix
it. The CLI prints it as one line (no traceback unless `--debug`); library callers can catch it.
"""

from __future__ import annotations

import difflib


class SlmError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported format."""


def unknown_choice(kind: str, name: str, choices: list[str]) -> SlmError:
    """An error for an unknown name that suggests the closest known ones."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return SlmError(f"unknown {kind} '{name}'.{hint} Known: {', '.join(sorted(choices))}.")

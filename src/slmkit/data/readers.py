"""Read documents from .txt, .jsonl, .csv and .parquet files, given as files, globs or directories.

A .txt file holds many documents: split on a separator (`<|endoftext|>`, a blank line, or any
string); "auto" uses `<|endoftext|>` when the file contains it and blank lines otherwise. Record
formats take the text from one field. Every problem names the file (and line) and the fix.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

from slmkit.errors import SlmError

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
EOT = "<|endoftext|>"


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, matched by a glob, or found (recursively) in a directory."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise SlmError(f"directory '{item}' has no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise SlmError(f"no file matches '{item}'")
            files += matched
        else:
            raise SlmError(f"input '{item}' not found")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise SlmError(f"'{f}' has an unsupported type (supported: {', '.join(SUFFIXES)})")
    return list(dict.fromkeys(files))  # de-duplicate, keep order


def read_documents(path: Path, text_field: str = "text", separator: str = "auto") -> Iterator[str]:
    """The non-empty documents of one file, stripped of surrounding whitespace."""
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    arg = separator if path.suffix == ".txt" else text_field
    try:
        for doc in readers[path.suffix](path, arg):
            doc = doc.strip()
            if doc:
                yield doc
    except OSError as err:
        raise SlmError(f"cannot read '{path}': {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise SlmError(f"'{path}' is not UTF-8 text (byte {err.start}); convert it to UTF-8") from err


def _read_txt(path: Path, separator: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    if separator == "auto":
        separator = EOT if EOT in text else "\n\n"
    if separator == "\n\n":  # blank lines, whatever whitespace they hold
        yield from re.split(r"\n[ \t]*\n", text)
    else:
        yield from text.split(separator)


def _field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise SlmError(f"{where} has no field '{field}' (fields: {', '.join(map(str, record))}); "
                       "choose one with text_field=NAME")
    value = record[field]
    if not isinstance(value, str):
        raise SlmError(f"{where}: field '{field}' is {type(value).__name__}, not text")
    return value


def json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSON-lines file; a bad line is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SlmError(f"{path}:{number} is not valid JSON ({err.msg}); fix or remove that line") from err
            if not isinstance(record, dict):
                raise SlmError(f"{path}:{number} is not a JSON object")
            yield f"{path}:{number}", record


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for where, record in json_records(path):
        yield _field(record, field, where)


def _read_csv(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        if field not in reader.fieldnames:
            raise SlmError(f"'{path}' has no column '{field}' (columns: {', '.join(reader.fieldnames)}); "
                           "choose one with text_field=NAME")
        for row in reader:
            yield row[field] or ""


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise SlmError("reading .parquet needs pyarrow: pip install 'slmkit[data]'") from err
    names = pq.read_schema(path).names
    if field not in names:
        raise SlmError(f"'{path}' has no column '{field}' (columns: {', '.join(names)}); "
                       "choose one with text_field=NAME")
    for value in pq.read_table(path, columns=[field]).column(field).to_pylist():
        yield value or ""

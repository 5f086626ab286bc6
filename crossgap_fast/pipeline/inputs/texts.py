"""Text files: one text per line (``.txt``), JSON lines (``.jsonl``), a JSON array
(``.json``) and CSV (``.csv``), read as UTF-8 (a leading byte-order mark is dropped).

Names: a text's line number (1-based) in a ``.txt``; its ``id`` field / column (else its
line / row / array position, 1-based) in a ``.jsonl`` / ``.csv`` / ``.json``. Ids name the
results, so :func:`check_unique_ids` refuses a repeated one (parquet tables too).
:func:`pick_column` chooses a field or column by name, here and for parquet tables.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from crossgap_fast.errors import InputError

TEXT_FIELDS = ("text", "caption")
ID_FIELDS = ("id", "name")
#: Text inputs are read with this codec: UTF-8, minus a leading byte-order mark (which
#: Windows tools write and which would otherwise stick to the first path or column name).
TEXT_ENCODING = "utf-8-sig"


def pick_column(found: Sequence[str], options: Sequence[str]) -> str | None:
    """The first of ``options`` among ``found``, compared case-insensitively."""
    lower = {c.lower(): c for c in found}
    for o in options:
        if o in lower:
            return lower[o]
    return None


def read_texts(path: str | os.PathLike) -> tuple[list[str], list[str | None], dict[int, dict]]:
    """(names, texts, issues) of a ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` file (UTF-8,
    an optional byte-order mark is dropped). An entry that cannot be used (bad JSON line, no
    text field, a non-string) is an error item with text None. A ``.json`` file holds one
    array of strings or of objects like a ``.jsonl`` line; its names are the 1-based
    positions (or the objects' ids). Ids (``.jsonl``, ``.json``, ``.csv``) must be unique."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as err:
        raise InputError(f"text input {str(path)!r} is not UTF-8 ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise InputError(f"text input {str(path)!r} cannot be read ({err.strerror or err})") from err
    if suffix in (".jsonl", ".json", ".csv"):
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        names, texts, issues = reader(path, raw)
        check_unique_ids(path, names)
        return names, texts, issues
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise InputError(f"text input {str(path)!r} is empty")
    return [str(i + 1) for i in range(len(lines))], list(lines), {}


def _read_jsonl(path: Path, raw: str):
    names, texts, issues = [], [], {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            issues[len(names)] = {"level": "error", "reason": f"invalid JSON ({err})"}
            names.append(str(lineno))
            texts.append(None)
            continue
        _add_json_entry(obj, str(lineno), names, texts, issues)
    if not names:
        raise InputError(f"text input {str(path)!r} has no JSON lines")
    return names, texts, issues


def _read_json(path: Path, raw: str):
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InputError(f"text input {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise InputError(
            f"text input {str(path)!r} holds a JSON {type(data).__name__}: a .json input must be "
            "an array of strings or of objects with a 'text' field (or use .jsonl, one object per line)"
        )
    if not data:
        raise InputError(f"text input {str(path)!r} is an empty JSON array")
    names, texts, issues = [], [], {}
    for position, obj in enumerate(data, start=1):
        if isinstance(obj, str):
            names.append(str(position))
            texts.append(obj)
        else:
            _add_json_entry(obj, str(position), names, texts, issues)
    return names, texts, issues


def _add_json_entry(obj: Any, fallback_name: str, names: list, texts: list, issues: dict) -> None:
    """Append one JSON object's (name, text), or an error item when it has no usable text."""
    i = len(names)
    id_key = pick_column(list(obj), ID_FIELDS) if isinstance(obj, dict) else None
    names.append(str(obj[id_key]) if id_key is not None else fallback_name)
    text, reason = json_text(obj)
    texts.append(text)
    if reason is not None:
        issues[i] = {"level": "error", "reason": reason}


def json_text(obj: Any) -> tuple[str | None, str | None]:
    """(text, None) of a JSON object with a "text" (or "caption") string, else (None, why)."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    key = pick_column(list(obj), TEXT_FIELDS)
    if key is None:
        return None, f"no {' or '.join(map(repr, TEXT_FIELDS))} field"
    if not isinstance(obj[key], str):
        return None, f"field {key!r} is not a string"
    return obj[key], None


def check_unique_ids(path: Path, names: list[str], what: str = "text input") -> None:
    """Names are the keys of the stored results: two items with one id would be ambiguous."""
    counts = Counter(names)
    dups = [n for n, c in counts.items() if c > 1]
    if dups:
        shown = ", ".join(f"{n!r} x{counts[n]}" for n in dups[:5]) + (", ..." if len(dups) > 5 else "")
        raise InputError(
            f"{what} {str(path)!r} has {len(dups)} duplicate id(s) ({shown}); ids name the "
            "results, so they must be unique"
        )


def _read_csv(path: Path, raw: str):
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    fields = reader.fieldnames or []
    key = pick_column(fields, TEXT_FIELDS)
    if key is None:
        raise InputError(
            f"CSV input {str(path)!r} has no text column: expected one of "
            f"{', '.join(TEXT_FIELDS)}, found {', '.join(fields) or 'no header'}"
        )
    id_key = pick_column(fields, ID_FIELDS)
    names, texts = [], []
    for row_no, row in enumerate(reader, start=1):
        names.append(str(row[id_key]) if id_key is not None and row.get(id_key) else str(row_no))
        value = row.get(key)
        texts.append(value if isinstance(value, str) else "")
    if not names:
        raise InputError(f"CSV input {str(path)!r} has no rows")
    return names, texts, {}

"""JSON Lines reading shared by every data reader (training sets, safety sets, classifier inputs).

A malformed file is a FormatError naming the file and line; a missing file an InputError naming what was
expected in it. `.gz` files are read transparently.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from gemmakit.errors import FormatError, InputError


def open_text(path: str | Path, expected: str = "") -> TextIO:
    """A text handle on `path` (gunzipped for `.gz`); `expected` says in the error what the file should hold."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file" + (f"; expected {expected}" if expected else ""))
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def iter_jsonl(path: str | Path, expected: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; each line must be one JSON object."""
    with open_text(path, expected) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{number}: not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise FormatError(f"{path}:{number}: expected a JSON object per line")
            yield number, record

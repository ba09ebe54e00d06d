"""Reading data files: a JSON list of records, or JSON Lines (one record a line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.errors import DataError


def read_items(path: Path) -> list[tuple[str, Any]]:
    """Parse ``path`` into (where, record) pairs; ``where`` is ``file:line`` or ``file: record i``.

    A ``.jsonl`` file holds one JSON value a line (blank lines skipped); any other suffix means
    one JSON list. Checking what each record holds is the caller's business.

    Raises:
        DataError: unreadable text, malformed JSON, not a list, or no records; the message
            names the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                items.append((f"{path}:{lineno}", _parse(line, f"{path}:{lineno}")))
    else:
        data = _parse(text, str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or use a .jsonl file)")
        items = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    if not items:
        raise DataError(f"{path}: no records")
    return items


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None

"""Reading the small JSON and JSONL files every room keeps (config.json, train_state.json, prompt and held-out files)
with errors that name the file, and the line, and say what is wrong. Each caller passes the error type of its room
(``ConfigError`` for user input, ``CheckpointError`` for a model directory, …)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import ConfigError


def read_json(path: str | Path, error: type[Exception] = ConfigError, *, missing: str = "file not found") -> dict:
    """The JSON object in ``path``; ``error("<path>: <missing>")`` when there is no such file, and ``error`` naming the
    file when it is not valid JSON or not an object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{p}: {missing}") from None
    except json.JSONDecodeError as e:
        raise error(f"{p}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{p}: the top level must be an object, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path, error: type[Exception] = ConfigError) -> list[tuple[int, Any]]:
    """Every non-blank line of ``path`` as (line number, decoded value); ``error("<path>:<line>: …")`` on the first
    line that is not valid JSON."""
    p = Path(path)
    rows = []
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((ln, json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{p}:{ln}: not valid JSON: {e}") from e
    return rows

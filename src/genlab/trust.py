"""The trust boundary: everything genlab reads that it did not just write (a run's recorded config,
a checkpoint's dictionaries, JSON records such as ``metrics.json``) is parsed here, as data, before
anything uses it."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None where the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None

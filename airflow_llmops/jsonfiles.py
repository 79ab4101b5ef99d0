"""Small JSON-file helpers shared by every layer (no dependencies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when the file is missing, unreadable, half-written or not JSON."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return dict(value) if isinstance(value, dict) else None

"""URI helpers shared by every layer (no dependencies)."""

from __future__ import annotations

import re

_CONN_IN_URI = re.compile(r"^([a-z0-9+.-]+://)[^/@]+@", re.IGNORECASE)


def display_uri(path: object) -> str:
    """``str(path)`` without the ``conn_id@`` that Airflow's ObjectStoragePath puts into its URIs."""
    return _CONN_IN_URI.sub(r"\1", str(path))

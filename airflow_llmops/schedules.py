"""Schedules of the reference DAGs, switchable per deployment without editing the DAG files."""

from __future__ import annotations

import os

OFF_VALUES = {"off", "none", "false", "0"}


def reference_schedule(default: str) -> str | None:
    """``default`` (a cron expression or preset), or ``None`` when ``LLMOPS_REFERENCE_SCHEDULES`` is ``off``.

    Only time-based schedules are switched off; a DAG scheduled on an Asset keeps it. The demo uses this: it
    triggers the pipeline and the drift monitor itself, so unpausing them must not also queue a scheduled run
    of the latest interval, while the retrain DAG still starts from the drift Asset.
    """
    return None if os.environ.get("LLMOPS_REFERENCE_SCHEDULES", "").strip().lower() in OFF_VALUES else default

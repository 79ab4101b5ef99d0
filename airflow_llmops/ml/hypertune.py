"""A tuning trial's metric reported to Vertex AI's hyperparameter tuning service, as ``cloudml-hypertune`` does it.

The service reads JSON lines from ``$CLOUD_ML_HP_METRIC_FILE`` (default ``/tmp/hypertune/output.metrics``) in
the trial's container: ``{"global_step": "120", "<metric>": "0.8125", "timestamp": 1764400000.5, "trial": "3"}``;
the last line is the trial's final measurement, earlier ones the intermediate measurements automated stopping
compares. The metric to report is named by ``$LLMOPS_HP_METRIC`` (set by the adapter's tuning job; outside a
tuning trial nothing is written).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

ENV_METRIC = "LLMOPS_HP_METRIC"
ENV_FILE = "CLOUD_ML_HP_METRIC_FILE"
DEFAULT_FILE = "/tmp/hypertune/output.metrics"


def report(metrics: Mapping[str, object], step: int, env: Mapping[str, str] | None = None) -> str | None:
    """Append the tuned metric's value at ``step``; returns the line written (``None``: not a trial, or the
    metric is not among ``metrics``)."""
    env = os.environ if env is None else env
    name = env.get(ENV_METRIC)
    value = metrics.get(name) if name else None
    if not name or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    line = json.dumps(
        {
            "global_step": str(int(step)),
            name: str(float(value)),
            "timestamp": time.time(),
            "trial": str(env.get("CLOUD_ML_TRIAL_ID", "0")),
        }
    )
    path = Path(env.get(ENV_FILE) or DEFAULT_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    return line

"""A tuning trial's metric reported to the cloud's tuning service: Vertex AI's hypertune file, or Azure ML's
MLflow run.

Vertex AI reads JSON lines from ``$CLOUD_ML_HP_METRIC_FILE`` (default ``/tmp/hypertune/output.metrics``) in the
trial's container, as ``cloudml-hypertune`` writes them:
``{"global_step": "120", "<metric>": "0.8125", "timestamp": 1764400000.5, "trial": "3"}``; the last line is the
trial's final measurement, earlier ones the intermediate measurements automated stopping compares.

Azure ML's sweep jobs read the primary metric from the trial's own MLflow run (the workspace's tracking server,
which Azure ML names in the trial's ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_RUN_ID``); each value logged is one
evaluation interval for the early-termination policy. The runtime keeps those two as ``$LLMOPS_HP_MLFLOW_URI`` /
``$LLMOPS_HP_MLFLOW_RUN_ID`` (the training itself logs to the pipeline's MLflow server), and a trial with them set
reports there instead of the file.

The metric to report is named by ``$LLMOPS_HP_METRIC`` (set by the adapter's tuning job; outside a tuning trial
nothing is reported).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ENV_METRIC = "LLMOPS_HP_METRIC"
ENV_FILE = "CLOUD_ML_HP_METRIC_FILE"
DEFAULT_FILE = "/tmp/hypertune/output.metrics"
#: Azure ML: the workspace's MLflow server and the trial's run there (what Azure ML injected as
#: ``MLFLOW_TRACKING_URI`` / ``MLFLOW_RUN_ID``).
ENV_MLFLOW_URI = "LLMOPS_HP_MLFLOW_URI"
ENV_MLFLOW_RUN = "LLMOPS_HP_MLFLOW_RUN_ID"
#: Azure ML's token for its own MLflow server (its ``MLFLOW_TRACKING_TOKEN``), set only around the report.
ENV_MLFLOW_TOKEN = "LLMOPS_HP_MLFLOW_TOKEN"


@contextlib.contextmanager
def _token(token: str | None) -> Iterator[None]:
    """``$MLFLOW_TRACKING_TOKEN`` = Azure ML's token for the duration of one call (the process's own MLflow
    logging, to the pipeline's server, must not carry it)."""
    if not token:
        yield
        return
    before = os.environ.get("MLFLOW_TRACKING_TOKEN")
    os.environ["MLFLOW_TRACKING_TOKEN"] = token
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
        else:
            os.environ["MLFLOW_TRACKING_TOKEN"] = before


def report(metrics: Mapping[str, object], step: int, env: Mapping[str, str] | None = None) -> str | None:
    """Report the tuned metric's value at ``step``; returns what was reported (``None``: not a trial, or the
    metric is not among ``metrics``). Azure ML's MLflow run when the trial has one, else Vertex's file."""
    env = os.environ if env is None else env
    name = env.get(ENV_METRIC)
    value = metrics.get(name) if name else None
    if not name or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    run_id = env.get(ENV_MLFLOW_RUN)
    if run_id:
        from mlflow.tracking import MlflowClient

        with _token(env.get(ENV_MLFLOW_TOKEN)):
            MlflowClient(tracking_uri=env.get(ENV_MLFLOW_URI) or None).log_metric(
                run_id, name, float(value), step=int(step)
            )
        return f"{name}={float(value)} at step {int(step)} to the sweep trial's MLflow run {run_id}"
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

"""Drift of live traffic against the training data (Evidently 0.7): text descriptors, sentence embeddings,
predicted labels and latency, over one time window of the model server's request log.

No Airflow here: :class:`~airflow_llmops.operators.drift.DriftCheckOperator` wraps it, ``bench/drift.py`` calls it
directly. A window *drifts* when at least ``policy.checks_to_agree`` of the enabled checks flag it.

* :mod:`.inputs`: the reference dataset, request-log windows, the latency baseline, simulated traffic;
* :mod:`.capture`: SageMaker Data Capture files as the same windows;
* :mod:`.vertex_log`: Vertex AI request-response logging rows (exported from BigQuery) as the same windows;
* :mod:`.features`: text descriptors and sentence embeddings;
* :mod:`.checks`: :func:`compute_drift` and its :class:`DriftResult`.
"""

from __future__ import annotations

from airflow_llmops.ml.drift.capture import CaptureWindow, read_capture, read_capture_window
from airflow_llmops.ml.drift.checks import EMBEDDINGS_NAME, CheckResult, DriftResult, compute_drift
from airflow_llmops.ml.drift.features import (
    TEXT_DESCRIPTORS,
    embed_texts,
    reference_embeddings,
    text_descriptors,
    vocabulary,
)
from airflow_llmops.ml.drift.inputs import (
    DriftError,
    Reference,
    Window,
    earliest_latencies,
    load_reference,
    read_window,
    simulated_records,
    write_request_log,
)
from airflow_llmops.ml.drift.vertex_log import read_vertex_log, read_vertex_log_window

__all__ = [
    "EMBEDDINGS_NAME",
    "TEXT_DESCRIPTORS",
    "CaptureWindow",
    "CheckResult",
    "DriftError",
    "DriftResult",
    "Reference",
    "Window",
    "compute_drift",
    "earliest_latencies",
    "embed_texts",
    "load_reference",
    "read_capture",
    "read_capture_window",
    "read_vertex_log",
    "read_vertex_log_window",
    "read_window",
    "reference_embeddings",
    "simulated_records",
    "text_descriptors",
    "vocabulary",
    "write_request_log",
]

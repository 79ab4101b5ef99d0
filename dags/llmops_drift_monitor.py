"""Drift monitor: every hour, the local endpoint's traffic against the data its model was trained on."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_llmops.operators.data import dataset_asset
from airflow_llmops.operators.drift import DriftCheckOperator, EndpointMetricsOperator
from airflow_llmops.schedules import reference_schedule

DATASET = "chatterbot-topics"
ENDPOINT = "chatterbot-topics"
MODEL = "chatterbot-topics-classifier"

DOC = """
### LLMOps — drift monitor

Every hour `drift` compares the last hour of the local endpoint `chatterbot-topics`'s request log
(`<[llmops] local_endpoints_root>/chatterbot-topics/requests`) with the training split of the dataset the
reference pipeline `llmops_local` prepared, with Evidently: text descriptors (length, out-of-vocabulary rate,
non-ASCII and non-Latin letter shares), all-MiniLM-L6-v2 embeddings, predicted labels and latency (against the
log's earliest hour, kept as a baseline file). A drifted hour, at most once per `cooldown_hours`, is an event on
the Asset `x-llmops://chatterbot-topics-classifier/drift`, which schedules `llmops_retrain`.

* **Reference**: the Param `reference_uri`, else the dataset of the latest event on the Asset
  `x-llmops://datasets/chatterbot-topics` (each `prepare` of `llmops_local` records one): the monitor follows
  the newest prepared data without configuration, and fails with a clear message until a dataset exists.
* **Endpoint metrics**: `endpoint_metrics` records p50/p95 latency, throughput and error rate per variant, and
  the server's energy per 1k requests and per 1k tokens (its CPU time x `watts_per_cpu_core`, an estimate), to
  MLflow as a time series; skipped when no endpoint server runs (it never starts one).
* **Report**: the Evidently HTML reports and `drift.json` are in the run folder, linked from the task.
"""

with DAG(
    dag_id="llmops_drift_monitor",
    description="Hourly drift check of the local endpoint's traffic",
    schedule=reference_schedule("@hourly"),  # LLMOPS_REFERENCE_SCHEDULES=off: triggered runs only
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "llmops", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llmops", "local", "reference", "drift"],
    doc_md=DOC,
    render_template_as_native_obj=True,
    params={
        "reference_uri": Param("", type="string", description="prepared dataset; empty: the latest prepared one"),
        "endpoint": Param(ENDPOINT, type="string", minLength=1),
        "window_minutes": Param(60, type="integer", minimum=1),
        "window_end": Param(
            "", type="string", description="unix seconds or ISO 8601; empty: the run's data interval end, else now"
        ),
        "sample_size": Param(2000, type="integer", minimum=30, description="rows compared per window"),
        "cooldown_hours": Param(24, type="number", minimum=0, description="at most one retrain signal per period"),
    },
) as dag:

    @task(inlets=[dataset_asset(DATASET)])
    def reference(params: dict[str, Any] | None = None, inlet_events: Any = None) -> str:
        """The reference dataset: the Param, else the latest prepared dataset's URI."""
        if params and params.get("reference_uri"):
            return str(params["reference_uri"])
        import time

        for attempt in range(6):
            try:
                events = list(inlet_events[dataset_asset(DATASET)])  # fetched here
                break
            except Exception as err:  # Airflow 3.3.2 answers 500 while a run created by these events is queued
                if attempt == 5:
                    raise RuntimeError(
                        f"cannot read the events of x-llmops://datasets/{DATASET} ({err}); a DAG run they created "
                        "may still be queued (apache/airflow#71360): retry, or set the Param reference_uri"
                    ) from None
                time.sleep(5 * (attempt + 1))
        if not events:
            raise ValueError(
                f"no prepared dataset yet: run llmops_local (it publishes x-llmops://datasets/{DATASET}) "
                "or set the Param reference_uri"
            )
        return str(events[-1].extra["dataset_uri"])

    drift = DriftCheckOperator(
        task_id="drift",
        model_name=MODEL,
        reference_uri="{{ ti.xcom_pull(task_ids='reference') }}",
        endpoint_name="{{ params.endpoint }}",  # its request log: <local_endpoints_root>/<endpoint>/requests
        window_end="{{ params.window_end }}",
        policy={
            "window_minutes": "{{ params.window_minutes }}",
            "sample_size": "{{ params.sample_size }}",
            "min_rows": 30,
            # The measured defaults (bench/drift.py): one text descriptor moving by >= 0.3 standard deviations is
            # enough (a new language moves the out-of-vocabulary rate, not the length), embeddings by MMD², and two
            # checks must agree: a single test at p < 0.05 (latency, predictions) alarms in 1 window of 20 by itself.
            "drift_share": 0.25,
            "min_drifted_checks": 2,
            "cooldown_hours": "{{ params.cooldown_hours }}",
        },
    )
    EndpointMetricsOperator(task_id="endpoint_metrics", endpoint_name="{{ params.endpoint }}", window_minutes=60)
    reference() >> drift

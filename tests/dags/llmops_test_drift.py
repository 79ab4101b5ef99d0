"""DAGs the drift tests run with dag.test(): the check on a simulated request log, and a consumer of its Asset."""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

from airflow_llmops.operators.drift import DriftCheckOperator, drift_asset

MODEL = "drift-test-model"

with DAG(
    "llmops_test_drift",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "reference_uri": Param("", type="string"),
        "request_log_uri": Param("", type="string"),
        "window_end": Param(None, type=["null", "number", "string"]),
        "artifact_root": Param("", type="string"),
        "policy": Param({}, type="object"),
        "tracking_uri": Param("", type="string"),
    },
) as drift_dag:
    DriftCheckOperator(
        task_id="drift",
        model_name=MODEL,
        reference_uri="{{ params.reference_uri }}",
        request_log_uri="{{ params.request_log_uri }}",
        window_end="{{ params.window_end }}",
        policy="{{ params.policy }}",
        artifact_root="{{ params.artifact_root }}",
        mlflow_tracking_uri="{{ params.tracking_uri }}",
    )

with DAG("llmops_test_drift_consumer", schedule=[drift_asset(MODEL)], start_date=datetime(2026, 1, 1)) as consumer_dag:
    EmptyOperator(task_id="noop")

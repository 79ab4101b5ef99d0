"""The DAG the Data Capture drift tests run with dag.test(): the drift check on SageMaker Data Capture files."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators.drift import DriftCheckOperator

MODEL = "drift-capture-test-model"

with DAG(
    "llmops_test_drift_capture",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "reference_uri": Param("", type="string"),
        "capture_uri": Param("", type="string"),
        "window_end": Param(None, type=["null", "number", "string"]),
        "artifact_root": Param("", type="string"),
        "policy": Param({}, type="object"),
    },
) as capture_dag:
    DriftCheckOperator(
        task_id="drift",
        model_name=MODEL,
        reference_uri="{{ params.reference_uri }}",
        capture_uri="{{ params.capture_uri }}",
        window_end="{{ params.window_end }}",
        policy="{{ params.policy }}",
        artifact_root="{{ params.artifact_root }}",
        mlflow_tracking_uri="",
    )

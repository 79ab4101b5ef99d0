"""A DAG the LLMOps page's browser test runs with dag.test(): one provider task whose result (XCom) the page's
task-instance view shows."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators.drift import EndpointMetricsOperator

with DAG(
    "llmops_ui_demo",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={"retries": 0},
    params={"endpoints_root": Param("", type="string")},
) as ui_dag:
    EndpointMetricsOperator(
        task_id="endpoint_metrics",
        endpoint_name="ui-topics",
        endpoints_root="{{ params.endpoints_root }}",
        window_minutes=60,
        mlflow_tracking_uri="",
    )

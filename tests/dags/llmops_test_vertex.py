"""A DAG the Vertex AI tests run with dag.test(): deploy a registered version on the stand-in's endpoint and walk
its canary through the endpoint's traffic split."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import DeployModelOperator, RolloutOperator

with DAG(
    "llmops_test_vertex",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={
        "model_uri": Param("", type="string"),
        "traffic_steps": Param([50, 100], type="array"),
        "bake_seconds": Param(6, type="number"),
        "min_requests": Param(4, type="integer"),
    },
) as dag:
    deploy = DeployModelOperator(
        task_id="deploy",
        platform="vertex",
        platform_conn_id="google_cloud_default",
        platform_options={"poll_s": 1.0, "wait_timeout_s": 300.0},
        model_uri="{{ params.model_uri }}",
        endpoint_name="chatterbot-topics",
        rollout={
            "strategy": "canary",
            "traffic_steps": "{{ params.traffic_steps }}",
            "bake_seconds": "{{ params.bake_seconds }}",
            "slo": {"p95_latency_ms": 5000, "max_error_rate": 0.05, "min_requests": "{{ params.min_requests }}"},
        },
    )
    rollout = RolloutOperator(
        task_id="rollout", rollout="{{ ti.xcom_pull(task_ids='deploy') }}", poll_interval=1, max_wait_s=60
    )
    deploy >> rollout

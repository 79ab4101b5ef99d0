"""A DAG the rollout tests run with dag.test(): deploy a model, optionally break it (failure injection, tests only),
then walk the canary with RolloutHealthSensor."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, task

from airflow_llmops.operators import DeployModelOperator
from airflow_llmops.sensors.rollout import RolloutHealthSensor

with DAG(
    "llmops_test_rollout",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0},
    params={
        "model_uri": Param("", type="string"),
        "variant": Param("", type="string"),
        "endpoints_root": Param("", type="string"),
        "error_rate": Param(0.0, type="number"),
        "extra_latency_ms": Param(0.0, type="number"),
    },
) as rollout_dag:
    deploy = DeployModelOperator(
        task_id="deploy",
        model_uri="{{ params.model_uri }}",
        variant="{{ params.variant }}",
        endpoint_name="topics",
        endpoints_root="{{ params.endpoints_root }}",
        rollout={
            "strategy": "canary",
            "traffic_steps": [10, 50, 100],
            "bake_seconds": 3,
            "slo": {"p95_latency_ms": 2000, "max_error_rate": 0.05, "min_requests": 8},
        },
    )

    @task
    def inject_fault(rollout: dict, params: dict | None = None) -> None:
        """Make the new variant misbehave, as a broken model would (the server's test-only failure injection)."""
        from airflow_llmops.platforms.base import EndpointHandle
        from airflow_llmops.platforms.local_serving import LocalEndpoints

        assert params is not None
        if not params["error_rate"] and not params["extra_latency_ms"]:
            return
        platform = LocalEndpoints(**rollout["platform_kwargs"])
        with platform.client(EndpointHandle.from_dict(rollout["handle"])) as client:
            fault = {"error_rate": params["error_rate"], "extra_latency_ms": params["extra_latency_ms"]}
            client.update_variant(rollout["variant"], fault=fault)

    rollout = RolloutHealthSensor(
        task_id="rollout", rollout="{{ ti.xcom_pull(task_ids='deploy') }}", poll_interval=1, max_wait_s=60
    )
    deploy >> inject_fault(deploy.output) >> rollout

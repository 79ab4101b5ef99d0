"""A DAG the rollout tests run with dag.test(): deploy a model, optionally break it (failure injection, tests only),
then walk the canary with RolloutOperator."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, task

from airflow_llmops.operators import DeployModelOperator, RolloutOperator

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
        "bake_seconds": Param(3, type="number"),
        "traffic_steps": Param([10, 50, 100], type="array"),
        "auto_rollback": Param(True, type="boolean"),
        "deferrable": Param(False, type="boolean"),
        "max_pause_s": Param(86400, type="number"),
    },
) as rollout_dag:
    deploy = DeployModelOperator(
        task_id="deploy",
        model_uri="{{ params.model_uri }}",
        variant="{{ params.variant }}",
        endpoint_name="topics",
        endpoints_root="{{ params.endpoints_root }}",
        platform_options={"test_faults": True},
        rollout={
            "strategy": "canary",
            "traffic_steps": "{{ params.traffic_steps }}",
            "bake_seconds": "{{ params.bake_seconds }}",
            "auto_rollback": "{{ params.auto_rollback }}",
            "slo": {"p95_latency_ms": 2000, "max_error_rate": 0.05, "min_requests": 8},
        },
    )

    @task
    def inject_fault(rollout: dict, params: dict | None = None) -> None:
        """Make the new variant misbehave, as a broken model would (the server's test-only failure injection)."""
        from airflow_llmops.platforms import EndpointHandle, get_platform

        assert params is not None
        if not params["error_rate"] and not params["extra_latency_ms"]:
            return
        platform = get_platform(rollout["platform"], **rollout["platform_kwargs"])
        with platform.endpoints.client(EndpointHandle.from_dict(rollout["handle"])) as client:
            fault = {"error_rate": params["error_rate"], "extra_latency_ms": params["extra_latency_ms"]}
            client.update_variant(rollout["variant"], fault=fault)

    class _Rollout(RolloutOperator):
        """The rollout with its deferrable switch and pause limit taken from the run's params (dag.test runs
        triggers inline)."""

        def execute(self, context):  # type: ignore[no-untyped-def]
            self.deferrable = bool(context["params"]["deferrable"])
            self.max_pause_s = float(context["params"]["max_pause_s"])
            return super().execute(context)

    rollout = _Rollout(
        task_id="rollout", rollout="{{ ti.xcom_pull(task_ids='deploy') }}", poll_interval=1, max_wait_s=60
    )
    deploy >> inject_fault(deploy.output) >> rollout

"""The tail of the local reference pipeline, register → latest_only → deploy → rollout, with cheap stand-ins for
register, deploy and rollout, so the backfill tests can run many intervals; and the same tail without the gate,
to show the test would catch a missing one."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_llmops.operators import LatestOnlyGateOperator


def _tail(gate: bool) -> None:
    @task
    def register(dag_run: Any = None) -> dict[str, Any]:
        """Stands in for RegisterModelOperator: one version per interval."""
        return {"version": dag_run.logical_date.day if dag_run.logical_date else 0, "uri": "models:/m/1"}

    @task
    def deploy(registered: dict[str, Any]) -> str:
        """Stands in for DeployModelOperator: the step that must not run for a backfilled interval."""
        print(f"deploying version {registered['version']} to the live endpoint")
        return f"deployed version {registered['version']}"

    @task
    def rollout(deployed: str) -> str:
        return f"rolled out: {deployed}"

    registered = register()
    deployed = deploy(registered)
    if gate:
        latest_only = LatestOnlyGateOperator(
            task_id="latest_only", model_version="{{ (ti.xcom_pull(task_ids='register') or {}).get('version', '') }}"
        )
        registered >> latest_only >> deployed
    rollout(deployed)


_SHARED: dict[str, Any] = {
    "schedule": "@daily",
    "start_date": datetime(2026, 1, 1),
    "catchup": False,
    "render_template_as_native_obj": True,
    "default_args": {"retries": 0},
}

with DAG("llmops_test_latest_only", **_SHARED) as gated_dag:
    _tail(gate=True)

with DAG("llmops_test_no_gate", **_SHARED) as ungated_dag:
    _tail(gate=False)

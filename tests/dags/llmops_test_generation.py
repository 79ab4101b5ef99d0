"""The DAG the generation-gate tests run with dag.test(): a causal LM or chat model evaluated against the registry's
champion on held-out prompts; metric, bound, judge and generation sizes as Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import EvaluateModelOperator

with DAG(
    "llmops_test_generation",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0},
    params={
        "model_uri": Param("", type="string"),
        "dataset_uri": Param("", type="string"),
        "tracking_uri": Param("", type="string"),
        "registered_model_name": Param("chat-gate-test", type="string"),
        "metric": Param("auto", type="string"),
        "min_score": Param(None, type=["null", "number"]),
        "judge": Param(None, type=["null", "object"]),
        "generation_rows": Param(8, type="integer"),
    },
) as generation_dag:
    EvaluateModelOperator(
        task_id="evaluate",
        model_uri="{{ params.model_uri }}",
        dataset_uri="{{ params.dataset_uri }}",
        registered_model_name="{{ params.registered_model_name }}",
        metric="{{ params.metric }}",
        min_score="{{ params.min_score }}",  # type: ignore[arg-type]  # rendered as a number or None
        judge="{{ params.judge }}",
        generation_rows="{{ params.generation_rows }}",  # type: ignore[arg-type]  # rendered as an integer
        max_new_tokens=12,
        mlflow_tracking_uri="{{ params.tracking_uri }}",
        experiment="generation-gate-test",
    )

"""A DAG the optimize-and-gate tests run with dag.test(): quantize -> evaluate -> register -> promote."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import (
    EvaluateModelOperator,
    PromoteModelOperator,
    QuantizeModelOperator,
    RegisterModelOperator,
)

MODEL = "topics-test"

with DAG(
    "llmops_test_models",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0},
    params={
        "model_uri": Param("", type="string"),
        "dataset_uri": Param("", type="string"),
        "tracking_uri": Param("", type="string"),
        "max_quality_drop": Param(5.0, type="number"),
        "min_improvement": Param(0.0, type="number"),
    },
) as models_dag:
    quantize = QuantizeModelOperator(
        task_id="quantize",
        model_uri="{{ params.model_uri }}",
        dataset_uri="{{ params.dataset_uri }}",
        spec={
            "methods": ["torch_dynamic_int8"],
            "choose": "all_must_pass",
            "max_quality_drop": "{{ params.max_quality_drop }}",
            "latency_repeats": 3,
            "max_eval_rows": 200,
        },
        mlflow_tracking_uri="{{ params.tracking_uri }}",
    )
    evaluate = EvaluateModelOperator(
        task_id="evaluate",
        model_uri="{{ ti.xcom_pull(task_ids='quantize')['chosen_model_uri'] }}",
        dataset_uri="{{ params.dataset_uri }}",
        registered_model_name=MODEL,
        min_improvement="{{ params.min_improvement }}",
        mlflow_tracking_uri="{{ params.tracking_uri }}",
    )
    register = RegisterModelOperator(
        task_id="register",
        model_uri="{{ ti.xcom_pull(task_ids='quantize')['chosen_model_uri'] }}",
        dataset_uri="{{ params.dataset_uri }}",
        registered_model_name=MODEL,
        mlflow_tracking_uri="{{ params.tracking_uri }}",
    )
    promote = PromoteModelOperator(
        task_id="promote", registered_model_name=MODEL, mlflow_tracking_uri="{{ params.tracking_uri }}"
    )
    quantize >> evaluate >> register >> promote

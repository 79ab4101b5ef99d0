"""DAGs the data-stage tests run with dag.test(); sources and targets come in as Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import PrepareDatasetOperator, ValidateDatasetOperator

with DAG(
    "llmops_test_prepare",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "source": Param("file:///nowhere.jsonl", type="string"),
        "conn_id": Param(None, type=["null", "string"]),
        "artifact_root": Param("", type="string"),
        "validation": Param({}, type="object"),
    },
) as prepare_dag:
    prepared = PrepareDatasetOperator(
        task_id="prepare",
        dataset={"name": "tickets", "source": "{{ params.source }}", "conn_id": "{{ params.conn_id }}"},
        tokenizer=None,
        artifact_root="{{ params.artifact_root }}",
        artifact_conn_id="moto_s3",
    )
    ValidateDatasetOperator(
        task_id="validate",
        dataset_uri="{{ ti.xcom_pull(task_ids='prepare')['dataset_uri'] }}",
        dataset_conn_id="{{ params.conn_id }}",
        validation="{{ params.validation }}",
        artifact_root="{{ params.artifact_root }}",
    )
    prepared >> prepare_dag.get_task("validate")

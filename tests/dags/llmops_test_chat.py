"""The DAG the chat-data tests run with dag.test(): conversations prepared and gated; source and checks as Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import PrepareDatasetOperator, ValidateDatasetOperator

with DAG(
    "llmops_test_chat",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "source": Param("file:///nowhere.jsonl", type="string"),
        "artifact_root": Param("", type="string"),
        "validation": Param({}, type="object"),
    },
) as dag:
    prepared = PrepareDatasetOperator(
        task_id="prepare",
        dataset={"name": "chats", "source": "{{ params.source }}", "task": "chat"},
        tokenizer=None,
        artifact_root="{{ params.artifact_root }}",
    )
    validated = ValidateDatasetOperator(
        task_id="validate",
        dataset_uri="{{ ti.xcom_pull(task_ids='prepare')['dataset_uri'] }}",
        validation="{{ params.validation }}",
        artifact_root="{{ params.artifact_root }}",
    )
    prepared >> validated

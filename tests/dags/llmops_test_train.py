"""A DAG the training tests run with dag.test(): one TrainModelOperator, configured through Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import TrainModelOperator

with DAG(
    "llmops_test_train",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "dataset_uri": Param("", type="string"),
        "jobs_root": Param("", type="string"),
        "tracking_uri": Param("", type="string"),
        "model": Param("", type="string"),
    },
) as train_dag:
    TrainModelOperator(
        task_id="train",
        spec={
            "model": "{{ params.model }}",
            "max_steps": 8,
            "per_device_batch_size": 8,
            "max_seq_length": 32,
            "checkpoint_every_steps": 4,
            "log_every_steps": 2,
            "distributed": {"nproc_per_node": 1},
        },
        dataset_uri="{{ params.dataset_uri }}",
        jobs_root="{{ params.jobs_root }}",
        mlflow_tracking_uri="{{ params.tracking_uri }}",
        deferrable=True,
        poll_interval=1,
        retries=0,
    )

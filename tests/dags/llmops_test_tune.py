"""A DAG the tuning tests run with dag.test(): one TuneHyperparametersOperator, configured through Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import TuneHyperparametersOperator

with DAG(
    "llmops_test_tune",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    params={
        "dataset_uri": Param("", type="string"),
        "jobs_root": Param("", type="string"),
        "tracking_uri": Param("", type="string"),
    },
) as tune_dag:
    TuneHyperparametersOperator(
        task_id="tune",
        spec={
            "training": {"max_steps": 4, "per_device_batch_size": 8, "max_seq_length": 32, "log_every_steps": 2},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 0.9, "log": True}},
            "n_trials": 3,
            "metric": "eval_loss",
            "eval_every_steps": 2,
            "pruner_startup_trials": 2,
            # Two sensible rates, then one that wrecks the model: the median pruner stops it at its first report.
            "initial_trials": [{"learning_rate": 1e-4}, {"learning_rate": 3e-4}, {"learning_rate": 0.9}],
        },
        dataset_uri="{{ params.dataset_uri }}",
        jobs_root="{{ params.jobs_root }}",
        mlflow_tracking_uri="{{ params.tracking_uri }}",
        retries=0,
    )

"""DAGs the SageMaker tests run with dag.test(): deploy a registered version on the stand-in's endpoint and walk
its rollout, stepwise or through SageMaker's own guarded deployment (the plan's ``native_guardrails``); and a
hyperparameter search as a SageMaker tuning job."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import DeployModelOperator, RolloutOperator, TuneHyperparametersOperator

with DAG(
    "llmops_test_sagemaker",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={
        "model_uri": Param("", type="string"),
        "variant": Param("", type="string"),
        "endpoint": Param("chatterbot-topics", type="string"),
        "strategy": Param("canary", type="string"),
        "traffic_steps": Param([50, 100], type="array"),
        "native_guardrails": Param(False, type="boolean"),
        "bake_seconds": Param(6, type="number"),
        "min_requests": Param(4, type="integer"),
        "autoscaling": Param(None, type=["null", "object"]),
    },
) as dag:
    deploy = DeployModelOperator(
        task_id="deploy",
        platform="sagemaker",
        platform_conn_id="aws_default",
        platform_options={"poll_s": 1.0, "wait_timeout_s": 300.0, "max_attempts": 2},
        model_uri="{{ params.model_uri }}",
        variant="{{ params.variant }}",
        endpoint_name="{{ params.endpoint }}",
        rollout={
            "strategy": "{{ params.strategy }}",
            "traffic_steps": "{{ params.traffic_steps if params.strategy == 'canary' else [] }}",
            "bake_seconds": "{{ params.bake_seconds }}",
            "native_guardrails": "{{ params.native_guardrails }}",
            "autoscaling": "{{ params.autoscaling }}",
            "slo": {"p95_latency_ms": 5000, "max_error_rate": 0.05, "min_requests": "{{ params.min_requests }}"},
        },
    )
    rollout = RolloutOperator(
        task_id="rollout", rollout="{{ ti.xcom_pull(task_ids='deploy') }}", poll_interval=1, max_wait_s=60
    )
    deploy >> rollout

with DAG(
    "llmops_test_sagemaker_tune",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={"dataset_uri": Param("", type="string"), "n_trials": Param(2, type="integer")},
) as tune_dag:
    TuneHyperparametersOperator(
        task_id="tune",
        platform="sagemaker",
        platform_conn_id="aws_default",
        platform_options={"instance_type": "ml.m5.large"},
        poll_interval=1,
        dataset_uri="{{ params.dataset_uri }}",
        spec={
            "training": {
                "max_steps": 4,
                "per_device_batch_size": 8,
                "max_seq_length": 32,
                "log_every_steps": 2,
                "checkpoint_every_steps": 1000,
                "distributed": {"nproc_per_node": 1},
            },
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                "warmup_ratio": {"type": "categorical", "choices": [0.0, 0.1]},
            },
            "n_trials": "{{ params.n_trials }}",
            "metric": "eval_accuracy",
        },
    )

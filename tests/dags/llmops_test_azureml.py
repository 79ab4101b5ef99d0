"""DAGs the Azure ML tests run with dag.test(): deploy a registered version on the stand-in's managed online endpoint
and walk its canary through the endpoint's traffic (or mirror it as a shadow); a drift check on the endpoint's
shipped request log."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import DeployModelOperator, RolloutOperator, TuneHyperparametersOperator
from airflow_llmops.operators.drift import DriftCheckOperator

with DAG(
    "llmops_test_azureml",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={
        "model_uri": Param("", type="string"),
        "strategy": Param("canary", type="string", enum=["canary", "shadow"]),
        "traffic_steps": Param([50, 100], type="array"),
        "shadow_percent": Param(50, type="number"),
        "bake_seconds": Param(6, type="number"),
        "min_requests": Param(4, type="integer"),
    },
) as dag:
    deploy = DeployModelOperator(
        task_id="deploy",
        platform="azureml",
        platform_conn_id="azure_ml_default",
        platform_options={"wait_timeout_s": 300.0},
        model_uri="{{ params.model_uri }}",
        endpoint_name="chatterbot-topics",
        rollout={
            "strategy": "{{ params.strategy }}",
            "traffic_steps": "{{ params.traffic_steps if params.strategy == 'canary' else [] }}",
            "shadow_percent": "{{ params.shadow_percent }}",
            "bake_seconds": "{{ params.bake_seconds }}",
            "slo": {"p95_latency_ms": 5000, "max_error_rate": 0.05, "min_requests": "{{ params.min_requests }}"},
        },
    )
    rollout = RolloutOperator(
        task_id="rollout", rollout="{{ ti.xcom_pull(task_ids='deploy') }}", poll_interval=1, max_wait_s=60
    )
    deploy >> rollout

with DAG(
    "llmops_test_azureml_drift",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={
        "reference_uri": Param("", type="string"),
        "request_log_uri": Param("", type="string"),
        "window_end": Param(None, type=["null", "number", "string"]),
        "artifact_root": Param("", type="string"),
        "policy": Param({}, type="object"),
    },
) as drift_dag:
    DriftCheckOperator(
        task_id="drift",
        model_name="chatterbot-topics-classifier",
        reference_uri="{{ params.reference_uri }}",
        request_log_uri="{{ params.request_log_uri }}",
        window_end="{{ params.window_end }}",
        policy="{{ params.policy }}",
        artifact_root="{{ params.artifact_root }}",
        mlflow_tracking_uri="",
    )

with DAG(
    "llmops_test_azureml_tune",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0, "owner": "llmops"},
    params={
        "dataset_uri": Param("", type="string"),
        "n_trials": Param(2, type="integer"),
        "sampler": Param("random", type="string", enum=["random", "tpe"]),
        "mlflow_tracking_uri": Param("", type="string"),
    },
) as tune_dag:
    # The workspace, compute, image and output_uri come from [llmops] azureml_*.
    TuneHyperparametersOperator(
        task_id="tune",
        platform="azureml",
        platform_conn_id="azure_ml_default",
        poll_interval=1,
        dataset_uri="{{ params.dataset_uri }}",
        mlflow_tracking_uri="{{ params.mlflow_tracking_uri }}",
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
            "sampler": "{{ params.sampler }}",
            "metric": "eval_accuracy",
        },
    )

"""The SageMaker reference pipeline against real AWS (Airflow providers' system-test convention).

Runs only with ``LLMOPS_SYSTEM_TESTS=aws`` (comma-separated list of clouds) and AWS credentials in the
environment; it creates a training job and a real endpoint (billed), and deletes the endpoint at the end.

Needs: ``LLMOPS_SAGEMAKER_ROLE_ARN``, ``LLMOPS_SAGEMAKER_IMAGE_URI`` (the runtime image in ECR),
``LLMOPS_SAGEMAKER_S3_PREFIX`` (``s3://bucket/prefix``) and ``LLMOPS_SYSTEM_MLFLOW_URI`` (an MLflow server the
endpoint can reach: registry versions are loaded from it); optional ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REQUIRED = (
    "LLMOPS_SAGEMAKER_ROLE_ARN",
    "LLMOPS_SAGEMAKER_IMAGE_URI",
    "LLMOPS_SAGEMAKER_S3_PREFIX",
    "LLMOPS_SYSTEM_MLFLOW_URI",
)


def _enabled() -> str | None:
    """Why the test cannot run here, or None."""
    if "aws" not in os.environ.get("LLMOPS_SYSTEM_TESTS", "").split(","):
        return "set LLMOPS_SYSTEM_TESTS=aws to run the SageMaker system test (it creates billed resources)"
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        return f"the SageMaker system test needs {', '.join(missing)}"
    import boto3

    if boto3.session.Session().get_credentials() is None:
        return "no AWS credentials in the environment"
    return None


def test_llmops_sagemaker_on_aws(airflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why = _enabled()
    if why:
        pytest.skip(why)
    prefix = os.environ["LLMOPS_SAGEMAKER_S3_PREFIX"].rstrip("/")
    for key, value in {
        "MLFLOW_TRACKING_URI": os.environ["LLMOPS_SYSTEM_MLFLOW_URI"],
        "ARTIFACT_ROOT": f"{prefix}/artifacts",
        "ARTIFACT_CONN_ID": "aws_default",
        "SAGEMAKER_ROLE_ARN": os.environ["LLMOPS_SAGEMAKER_ROLE_ARN"],
        "SAGEMAKER_IMAGE_URI": os.environ["LLMOPS_SAGEMAKER_IMAGE_URI"],
        "SAGEMAKER_S3_PREFIX": prefix,
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)
    # aws_default without a stored connection: boto3's own credential chain (environment, profile, role).
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws"}')
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from dags_under_test import load_dag

    from airflow_llmops.platforms import get_platform

    dag = load_dag("llmops_sagemaker")
    run = dag.test(run_conf={"max_steps": 50, "instance_count": 2, "bake_seconds": 120, "min_requests": 0})
    try:
        assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
        rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout")
        assert rolled["state"] == "succeeded"
    finally:
        get_platform("sagemaker", s3_prefix=prefix).stop_endpoint("chatterbot-topics")

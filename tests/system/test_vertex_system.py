"""The Vertex AI reference pipeline against real Google Cloud (Airflow providers' system-test convention).

Runs only with ``LLMOPS_SYSTEM_TESTS=gcp`` (comma-separated list of clouds) and application default credentials;
it creates a custom job and a real endpoint (billed), and removes the endpoint at the end.

Needs: ``LLMOPS_VERTEX_PROJECT``, ``LLMOPS_VERTEX_IMAGE_URI`` (the runtime image in Artifact Registry),
``LLMOPS_VERTEX_STAGING_URI`` (``gs://bucket/prefix``) and ``LLMOPS_SYSTEM_MLFLOW_URI`` (an MLflow server the
endpoint can reach); optional ``LLMOPS_VERTEX_REGION``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REQUIRED = ("LLMOPS_VERTEX_PROJECT", "LLMOPS_VERTEX_IMAGE_URI", "LLMOPS_VERTEX_STAGING_URI", "LLMOPS_SYSTEM_MLFLOW_URI")


def _enabled() -> str | None:
    """Why the test cannot run here, or None."""
    if "gcp" not in os.environ.get("LLMOPS_SYSTEM_TESTS", "").split(","):
        return "set LLMOPS_SYSTEM_TESTS=gcp to run the Vertex AI system test (it creates billed resources)"
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        return f"the Vertex AI system test needs {', '.join(missing)}"
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        return "no Google application default credentials"
    return None


def test_llmops_vertex_on_gcp(airflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why = _enabled()
    if why:
        pytest.skip(why)
    staging = os.environ["LLMOPS_VERTEX_STAGING_URI"].rstrip("/")
    for key, value in {
        "MLFLOW_TRACKING_URI": os.environ["LLMOPS_SYSTEM_MLFLOW_URI"],
        "ARTIFACT_ROOT": f"{staging}/artifacts",
        "ARTIFACT_CONN_ID": "google_cloud_default",
        "VERTEX_PROJECT": os.environ["LLMOPS_VERTEX_PROJECT"],
        "VERTEX_REGION": os.environ.get("LLMOPS_VERTEX_REGION", "us-central1"),
        "VERTEX_IMAGE_URI": os.environ["LLMOPS_VERTEX_IMAGE_URI"],
        "VERTEX_STAGING_URI": staging,
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", '{"conn_type": "google_cloud_platform"}')
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from dags_under_test import load_dag

    from airflow_llmops.platforms import get_platform

    dag = load_dag("llmops_vertex")
    run = dag.test(run_conf={"max_steps": 50, "replica_count": 2, "bake_seconds": 120, "min_requests": 0})
    try:
        assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
        assert run.get_task_instance("rollout").xcom_pull(task_ids="rollout")["state"] == "succeeded"
    finally:
        get_platform(
            "vertex",
            project=os.environ["LLMOPS_VERTEX_PROJECT"],
            region=os.environ.get("LLMOPS_VERTEX_REGION", "us-central1"),
            staging_uri=staging,
            image_uri=os.environ["LLMOPS_VERTEX_IMAGE_URI"],
        ).stop_endpoint("chatterbot-topics")

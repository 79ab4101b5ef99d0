"""Link from a training task to its MLflow run."""

from __future__ import annotations

from airflow_llmops.links.artifacts import _XComLink


def mlflow_run_url(tracking_uri: str, experiment_id: str | None, run_id: str) -> str | None:
    """The MLflow UI page of a run, where the tracking URI is an HTTP server (not a bare sqlite:// store)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = tracking_uri.rstrip("/")
    if experiment_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/runs/{run_id}"


class MLflowRunLink(_XComLink):
    label = "MLflow run"


class RegisteredModelLink(_XComLink):
    label = "MLflow model version"


def mlflow_model_version_url(tracking_uri: str, name: str, version: str) -> str | None:
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"

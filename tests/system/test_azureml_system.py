"""The Azure ML reference pipeline against real Azure (Airflow providers' system-test convention).

Runs only with ``LLMOPS_SYSTEM_TESTS=azure`` (comma-separated list of clouds) and Azure credentials that
``DefaultAzureCredential`` finds (environment service principal, workload or managed identity, ``az login``); it
creates a command job on the compute cluster and a real managed online endpoint (billed), and deletes the endpoint
at the end.

Needs: ``LLMOPS_AZUREML_SUBSCRIPTION_ID``, ``LLMOPS_AZUREML_RESOURCE_GROUP``, ``LLMOPS_AZUREML_WORKSPACE``,
``LLMOPS_AZUREML_COMPUTE`` (a compute cluster of at least two nodes), ``LLMOPS_AZUREML_IMAGE`` (the runtime image in
a registry the workspace pulls from), ``LLMOPS_AZUREML_OUTPUT_URI`` (``abfs://container@account.dfs.core.windows.net/
prefix``, which the job's and the endpoint's identities can read and write) and ``LLMOPS_SYSTEM_MLFLOW_URI`` (an
MLflow server the endpoint can reach); optional ``LLMOPS_AZUREML_INSTANCE_TYPE`` (the endpoint's VM size) and
``LLMOPS_AZURE_ARTIFACT_CONN_ID`` (an Airflow ``adls`` connection to the storage account, for the artifact root
under the output URI; default: none, the storage client's own credential chain).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REQUIRED = (
    "LLMOPS_AZUREML_SUBSCRIPTION_ID",
    "LLMOPS_AZUREML_RESOURCE_GROUP",
    "LLMOPS_AZUREML_WORKSPACE",
    "LLMOPS_AZUREML_COMPUTE",
    "LLMOPS_AZUREML_IMAGE",
    "LLMOPS_AZUREML_OUTPUT_URI",
    "LLMOPS_SYSTEM_MLFLOW_URI",
)


def _enabled() -> str | None:
    """Why the test cannot run here, or None."""
    if "azure" not in os.environ.get("LLMOPS_SYSTEM_TESTS", "").split(","):
        return "set LLMOPS_SYSTEM_TESTS=azure to run the Azure ML system test (it creates billed resources)"
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        return f"the Azure ML system test needs {', '.join(missing)}"
    try:
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import DefaultAzureCredential
    except ImportError:
        return "the azure extra is not installed (azure-ai-ml, azure-identity, azure-mgmt-monitor)"
    try:
        DefaultAzureCredential().get_token("https://management.azure.com/.default")
    except ClientAuthenticationError as err:
        return f"no Azure credentials: {str(err).splitlines()[0]}"
    return None


def test_llmops_azureml_on_azure(airflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why = _enabled()
    if why:
        pytest.skip(why)
    output = os.environ["LLMOPS_AZUREML_OUTPUT_URI"].rstrip("/")
    settings = {
        "subscription_id": os.environ["LLMOPS_AZUREML_SUBSCRIPTION_ID"],
        "resource_group": os.environ["LLMOPS_AZUREML_RESOURCE_GROUP"],
        "workspace_name": os.environ["LLMOPS_AZUREML_WORKSPACE"],
        "output_uri": output,
    }
    for key, value in {
        "MLFLOW_TRACKING_URI": os.environ["LLMOPS_SYSTEM_MLFLOW_URI"],
        "ARTIFACT_ROOT": f"{output}/artifacts",
        "ARTIFACT_CONN_ID": os.environ.get("LLMOPS_AZURE_ARTIFACT_CONN_ID", ""),
        "AZUREML_SUBSCRIPTION_ID": settings["subscription_id"],
        "AZUREML_RESOURCE_GROUP": settings["resource_group"],
        "AZUREML_WORKSPACE_NAME": settings["workspace_name"],
        "AZUREML_COMPUTE": os.environ["LLMOPS_AZUREML_COMPUTE"],
        "AZUREML_IMAGE": os.environ["LLMOPS_AZUREML_IMAGE"],
        "AZUREML_OUTPUT_URI": output,
        "AZUREML_INSTANCE_TYPE": os.environ.get("LLMOPS_AZUREML_INSTANCE_TYPE", "Standard_DS3_v2"),
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)
    # An `azure` connection without a secret: DefaultAzureCredential (the environment, managed identity, the CLI).
    if not os.environ.get("AIRFLOW_CONN_AZURE_ML_DEFAULT"):
        monkeypatch.setenv("AIRFLOW_CONN_AZURE_ML_DEFAULT", '{"conn_type": "azure"}')
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from dags_under_test import load_dag

    from airflow_llmops.platforms import get_platform

    dag = load_dag("llmops_azureml")
    # Azure Monitor publishes per minute, a minute or more late: two minutes of bake see numbers.
    run = dag.test(run_conf={"max_steps": 50, "instance_count": 2, "bake_seconds": 120, "min_requests": 0})
    try:
        assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
        assert run.get_task_instance("rollout").xcom_pull(task_ids="rollout")["state"] == "succeeded"
    finally:
        get_platform("azureml", **settings).stop_endpoint("chatterbot-topics")

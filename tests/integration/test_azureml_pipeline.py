"""``dags/llmops_azureml.py`` end to end under ``dag.test()`` against the Azure ML stand-in: a two-node low-priority
command job (the real runtime, a real model), quantize, evaluate, register in MLflow, deploy on a managed online
endpoint; then later versions whose canary passes, that is mirrored as a shadow and removed, and whose canary
breaches its SLO and rolls back through the endpoint's traffic; drift on the request logs the servers shipped.

The stand-in (``tests/standins/azureml.py``) answers the ARM calls of the real ``MLClient`` and
``MonitorManagementClient`` through an in-process transport, handed to the adapter by its test hook
``client_factory`` (so no Airflow connection is read); command jobs and deployments run the real runtime and model
server. Blob storage is not emulated: the artifact root and ``azureml_output_uri`` are local folders (``file://``),
which the adapter accepts for this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloud_pipeline import Traffic, register_again
from conftest import require_module

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("azureml-pipeline")]

MODEL = "chatterbot-topics-classifier"
ENDPOINT = "chatterbot-topics"
IMAGE = "llmops.azurecr.io/llmops/runtime:test"


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_module("azure.ai.ml")
    require_module("azure.mgmt.monitor")
    from standins.azureml import AzureMLStandIn

    with AzureMLStandIn(tmp_path_factory.mktemp("azureml"), container_env={"OMP_NUM_THREADS": "1"}) as standin:
        standin.install()  # the adapter's clients talk to the stand-in (dag.test() runs tasks in this process)
        try:
            yield standin
        finally:
            standin.uninstall()
    assert standin.errors == [], standin.errors


def _deployment(platform: Any, handle: Any, variant: str) -> str | None:
    found = {v["name"]: v["deployment"] for v in platform.describe_endpoint(handle).get("variants", [])}
    return found.get(variant)


def test_llmops_azureml_end_to_end(
    azure: Any, airflow_db: Path, mlflow_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dags_under_test import load_dag

    from airflow_llmops.platforms import EndpointHandle, get_platform

    output = (azure.root / "datastore").as_uri()
    for key, value in {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "AZUREML_SUBSCRIPTION_ID": azure.subscription_id,
        "AZUREML_RESOURCE_GROUP": azure.resource_group,
        "AZUREML_WORKSPACE_NAME": azure.workspace_name,
        "AZUREML_COMPUTE": "cpu-cluster",
        "AZUREML_IMAGE": IMAGE,
        "AZUREML_OUTPUT_URI": output,
        "AZUREML_INSTANCE_TYPE": "Standard_DS4_v2",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)

    dag = load_dag("llmops_azureml")
    assert dag.params["instance_type"] == "Standard_DS4_v2"  # the Params' defaults: [llmops] azureml_*
    conf = {
        "dataset_source": "chatterbot://english?topics=ai,food,greetings,money,sports",
        "max_steps": 12,
        "instance_count": 2,
        "low_priority": True,
        "quantization_methods": ["torch_dynamic_int8"],
        "max_quality_drop": 100.0,
        "bake_seconds": 0,
    }
    run = dag.test(run_conf=conf)
    assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
    trained = run.get_task_instance("train").xcom_pull(task_ids="train")
    assert trained["metrics"]["eval_accuracy"] > 0 and trained["mlflow_run_id"]
    assert Path(trained["model_uri"].removeprefix("file://"), "model.safetensors").is_file()
    job_name = run.get_task_instance("train").xcom_pull(task_ids="train", key="job")["job_id"]
    job = azure.ml_client().jobs.get(job_name)
    assert job.resources.instance_count == 2 and job.distribution.process_count_per_instance == 1
    assert job.compute == "cpu-cluster" and job.queue_settings.job_tier.lower() == "spot"
    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    assert deployed["platform"] == "azureml" and deployed["variant"] == f"v{registered['version']}"
    status, body, _ = azure.score(ENDPOINT, {"inputs": "what is your favourite food?"})
    assert status == 200 and body["variant"] == deployed["variant"] and body["results"][0]["label"], body

    platform = get_platform(
        "azureml",
        subscription_id=azure.subscription_id,
        resource_group=azure.resource_group,
        workspace_name=azure.workspace_name,
        output_uri=output,
    )
    handle = EndpointHandle(platform="azureml", endpoint_name=ENDPOINT)
    first = _deployment(platform, handle, deployed["variant"])
    assert azure.ml_client().online_deployments.get(first, ENDPOINT).instance_type == "Standard_DS4_v2"
    test_dag = load_dag("llmops_test_azureml", folder="tests/dags")

    def traffic() -> Traffic:
        return Traffic(lambda i: azure.score(ENDPOINT, {"inputs": f"do you like pizza {i}?"}))

    # -- a later version: canary 50 -> 100 judged on Azure Monitor numbers from live requests: passes -----------
    uri2 = register_again(mlflow_server.url, MODEL, registered["version"])
    with traffic():
        run2 = test_dag.test(run_conf={"model_uri": uri2})
    rolled2 = run2.get_task_instance("rollout").xcom_pull(task_ids="rollout") or {}
    assert run2.state == "success", rolled2
    v2 = rolled2["variant"]
    assert [s["status"] for s in rolled2["steps"]] == ["passed", "passed"], rolled2
    assert rolled2["steps"][0]["new"]["requests"] >= 4
    assert platform.get_traffic(handle) == {v2: 100.0}  # promoted; the old deployment deleted

    # -- the next one as a shadow: half of the requests mirrored to it, judged, removed; v2 serves throughout ----
    uri3 = register_again(mlflow_server.url, MODEL, registered["version"])
    test_dag = load_dag("llmops_test_azureml", folder="tests/dags")  # dag.test() keeps a run's conf in its params
    with traffic() as sent:
        run3 = test_dag.test(run_conf={"model_uri": uri3, "strategy": "shadow", "shadow_percent": 50})
    rolled3 = run3.get_task_instance("rollout").xcom_pull(task_ids="rollout") or {}
    assert run3.state == "success", rolled3
    assert [s["status"] for s in rolled3["steps"]] == ["passed"] and rolled3["steps"][0]["new"]["requests"] >= 4
    assert {a[2] for a in sent.answers if a[0] == 200} <= {_deployment(platform, handle, v2)}  # answers: v2 only
    assert platform.get_traffic(handle) == {v2: 100.0}
    assert [v["name"] for v in platform.describe_endpoint(handle)["variants"]] == [v2]
    assert platform.describe_endpoint(handle)["mirror"] == {}

    # -- the next version answers errors: the canary breaches and the traffic from before comes back --------------
    uri4 = register_again(mlflow_server.url, MODEL, registered["version"])
    v4 = f"v{uri4.rsplit('/', 1)[1]}"

    def break_it() -> None:  # as soon as v4's deployment exists, its container answers 500s
        for _ in range(600):
            name = _deployment(platform, handle, v4)
            if name:
                azure.fail_deployment(ENDPOINT, name, status=500)
                return
            time.sleep(0.2)

    breaker = threading.Thread(target=break_it, daemon=True)
    breaker.start()
    test_dag = load_dag("llmops_test_azureml", folder="tests/dags")
    with traffic():
        run4 = test_dag.test(run_conf={"model_uri": uri4})
    breaker.join(timeout=5)
    azure.clear_faults()
    assert run4.state == "failed"
    record = platform.get_rollout_record(ENDPOINT)
    assert record is not None and record.variant == v4 and record.state == "rolled_back", record
    assert "error rate" in record.message, record
    assert platform.get_traffic(handle) == {v2: 100.0}
    assert [v["name"] for v in platform.describe_endpoint(handle)["variants"]] == [v2]

    # -- drift on what the endpoint saw: the servers' request logs shipped under azureml_output_uri (the deleted
    # deployments shipped their last file on the way out) -----------------------------------------------------------
    shipped = azure.root / "datastore" / "endpoints" / ENDPOINT / "requests"
    assert sorted(shipped.glob("requests-*.jsonl")), list(shipped.parent.rglob("*"))
    reference = run.get_task_instance("validate").xcom_pull(task_ids="validate")["dataset_uri"]
    drift_dag = load_dag(
        "llmops_test_azureml_drift", folder="tests/dags", module="llmops_test_azureml", attr="drift_dag"
    )
    policy = {"window_minutes": 60, "min_rows": 20, "checks": ["text_descriptors", "prediction"]}
    drift = drift_dag.test(
        run_conf={
            "reference_uri": reference,
            "window_end": time.time() + 60,
            "policy": policy,
            "request_log_uri": shipped.as_uri(),
            "artifact_root": (azure.root / "drift").as_uri(),
        }
    ).get_task_instance("drift")
    assert drift.state == "success"
    out = drift.xcom_pull(task_ids="drift")
    assert out["rows"] >= 20 and out["verdict"] in ("drift", "no_drift"), out  # judged, not "too_few_rows"

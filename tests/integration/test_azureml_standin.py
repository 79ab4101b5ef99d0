"""Azure ML's own pieces against the stand-in, beyond the conformance suite: a two-node low-priority command job
(the runtime under Azure ML's PyTorch environment) preempted and resumed from its checkpoint; a shadow through
``mirror_traffic`` (Azure's limits checked by the service too), autoscaling as an Azure Monitor autoscale setting,
a failing deployment's errors in Azure Monitor, and data collection's payload logging read back as drift input."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_module

from airflow_llmops.platforms import get_platform
from airflow_llmops.specs import RolloutPlan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_module("azure.ai.ml")
    require_module("azure.mgmt.monitor")
    from standins.azureml import AzureMLStandIn

    with AzureMLStandIn(tmp_path_factory.mktemp("azureml"), container_env={"OMP_NUM_THREADS": "1"}) as found:
        found.install()
        try:
            yield found
        finally:
            found.uninstall()
            assert found.errors == [], found.errors


def test_shadow_autoscaling_and_errors_in_azure_monitor(standin: Any) -> None:
    from test_serving_models import build_classifier

    model = Path(build_classifier()).resolve().as_uri()
    platform = get_platform(
        "azureml",
        subscription_id=standin.subscription_id,
        resource_group=standin.resource_group,
        workspace_name=standin.workspace_name,
        image="llmops.azurecr.io/llmops/runtime:test",
        output_uri=(standin.root / "datastore").as_uri(),
    )
    first = platform.deploy(
        "shadowed", model_uri=model, variant="blue", plan=RolloutPlan.parse({"strategy": "blue_green"})
    )
    plan = RolloutPlan.parse(
        {
            "strategy": "shadow",
            "shadow_percent": 50,
            "autoscaling": {"min_instances": 1, "max_instances": 3, "target_cpu_percent": 60},
        }
    )
    shadow = platform.deploy("shadowed", model_uri=model, variant="green", plan=plan)
    assert shadow.extra["previous"] == {"blue": 100.0}
    assert platform.get_traffic(shadow) == {"blue": 100.0}  # the shadow takes no live traffic
    described = platform.describe_endpoint(shadow)
    green = next(v["deployment"] for v in described["variants"] if v["name"] == "green")
    assert described["mirror"] == {green: 50.0}
    [setting] = standin.autoscale_settings()
    assert setting["properties"]["targetResourceUri"].endswith(f"/deployments/{green}")
    assert setting["properties"]["profiles"][0]["capacity"] == {"minimum": "1", "maximum": "3", "default": "1"}

    # The service refuses what the adapter refuses: a second mirror, or over half of the traffic.
    ml = standin.ml_client()
    endpoint = ml.online_endpoints.get("shadowed")
    endpoint.mirror_traffic = {green: 60}
    with pytest.raises(Exception, match="cannot exceed 50"):
        ml.online_endpoints.begin_create_or_update(endpoint).result()

    standin.fail_deployment("shadowed", green, status=500)
    before = time.time()
    time.sleep(0.05)
    answers = [standin.score("shadowed", {"inputs": f"do you like pizza {i}?"}) for i in range(30)]
    assert {status for status, _, _ in answers} == {200}  # mirrored answers never reach the caller
    assert {deployment for _, _, deployment in answers} == {"blue"}
    rows = {m.variant: m for m in platform.read_metrics(shadow, variants=["blue", "green"], since=before)}
    assert rows["blue"].requests == 30 and rows["blue"].errors == 0 and rows["blue"].p95_latency_ms
    assert 0 < rows["green"].requests < 30 and rows["green"].errors == rows["green"].requests
    # Payload logging: every request the deployments saw, joined with its answer (a drift check's input)
    from airflow_llmops.ml.drift.azureml_collect import read_collected_window

    window = read_collected_window(standin.collected_folder("shadowed"), before, time.time() + 1)
    served = window.data[window.data["variant"] == "blue"]
    assert len(served) == 30 and served["output"].notna().all() and window.corrupt_lines == 0
    assert set(served["input"]) == {f"do you like pizza {i}?" for i in range(30)}
    mirrored = window.data[window.data["variant"] == "green"]  # the failing shadow: requests, no answers
    assert len(mirrored) == rows["green"].requests and mirrored["output"].isna().all()

    platform.finish(shadow, new_variant="green", keep_new=False)  # the shadow goes, the serving split stays
    assert platform.get_traffic(first) == {"blue": 100.0}
    assert platform.describe_endpoint(first)["mirror"] == {} and standin.autoscale_settings() == []
    platform.stop_endpoint("shadowed")
    assert platform.describe_endpoint(first)["status"] == "missing"


def _platform(standin: Any) -> Any:
    return get_platform(
        "azureml",
        subscription_id=standin.subscription_id,
        resource_group=standin.resource_group,
        workspace_name=standin.workspace_name,
        compute="cpu-cluster",
        image="llmops.azurecr.io/llmops/runtime:test",
        output_uri=(standin.root / "datastore").as_uri(),
    )


def test_a_two_node_low_priority_job_is_preempted_and_resumes(standin: Any, tmp_path: Path) -> None:
    from conftest import prepare_chatterbot

    from airflow_llmops.platforms import JobState
    from airflow_llmops.specs import TrainingSpec

    dataset = prepare_chatterbot(tmp_path / "data", topics="ai,food")
    spec = TrainingSpec.parse(
        {
            "dataset_uri": str(dataset),
            "max_steps": 9,
            "per_device_batch_size": 8,
            "max_seq_length": 32,
            "checkpoint_every_steps": 3,
            "distributed": {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": "node-0:29500", "use_spot": True},
        }
    )
    platform = _platform(standin)
    handle = platform.submit_training(spec, job_name="spot-two-nodes")
    standin.preempt("spot-two-nodes", after_checkpoint=True, timeout=600)  # a loaded machine is slow
    deadline = time.monotonic() + 600
    while not (status := platform.get_training_status(handle)).state.is_terminal:
        assert time.monotonic() < deadline, standin.job_logs("spot-two-nodes")
        time.sleep(0.5)
    logs = "\n".join(standin.job_logs("spot-two-nodes"))
    assert status.state is JobState.SUCCEEDED, f"{status.message}\n{logs}"
    assert "Azure ML node 1 of 2" in logs and "the low-priority node was preempted" in logs
    result = json.loads((standin.root / "datastore/training/spot-two-nodes/llmops/result.json").read_text())
    assert result["world_size"] == 2 and 0 < int(result["resumed_from_step"]) < 9, result
    assert status.model_uri and any((standin.root / "datastore/training/spot-two-nodes/model").iterdir())


def test_service_refusals_name_the_call_and_the_resource(standin: Any, tmp_path: Path) -> None:
    from airflow_llmops.platforms import PlatformRefusedError
    from airflow_llmops.specs import TrainingSpec

    settings = {**_platform(standin).settings.__dict__, "compute": "gpu-cluster"}  # well-formed, but not there
    spec = TrainingSpec.parse({"dataset_uri": str(tmp_path), "max_steps": 1})
    with pytest.raises(
        PlatformRefusedError, match=r"creating command job no-compute .*Compute gpu-cluster is not found"
    ):
        get_platform("azureml", **settings).submit_training(spec, job_name="no-compute")

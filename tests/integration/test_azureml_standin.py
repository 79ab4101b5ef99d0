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


def test_a_sweep_job_tunes_on_azure_ml_and_hands_on_the_best_trial(
    standin: Any, airflow_db: Path, mlflow_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from conftest import prepare_chatterbot
    from dags_under_test import load_dag
    from mlflow.tracking import MlflowClient

    dataset = prepare_chatterbot(tmp_path / "data", topics="ai,food,greetings,money")
    datastore = standin.root / "datastore"
    for key, value in {
        "AZUREML_SUBSCRIPTION_ID": standin.subscription_id,
        "AZUREML_RESOURCE_GROUP": standin.resource_group,
        "AZUREML_WORKSPACE_NAME": standin.workspace_name,
        "AZUREML_COMPUTE": "cpu-cluster",
        "AZUREML_IMAGE": "llmops.azurecr.io/llmops/runtime:test",
        "AZUREML_OUTPUT_URI": datastore.as_uri(),
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)
    dag = load_dag("llmops_test_azureml_tune", folder="tests/dags", module="llmops_test_azureml", attr="tune_dag")
    run = dag.test(run_conf={"dataset_uri": str(dataset), "n_trials": 2, "mlflow_tracking_uri": mlflow_server.url})
    ti = run.get_task_instance("tune")
    assert ti.state == "success", standin.errors
    out = ti.xcom_pull(task_ids="tune")

    sweep = standin.ml_client().jobs.get(out["job_name"])
    assert sweep.type == "sweep" and sweep.status == "Completed"
    assert sweep.objective.primary_metric == "eval_accuracy" and sweep.limits.max_total_trials == 2
    assert sweep.properties["best_child_run_id"] == out["best_training_job"]
    values = [t["value"] for t in out["trials"]]
    assert len(values) == 2 and out["best_value"] == max(v for v in values if v is not None)
    best = out["best_params"]
    assert 1e-5 <= best["learning_rate"] <= 1e-3 and best["warmup_ratio"] in (0.0, 0.1)
    assert out["best_training_spec"]["learning_rate"] == best["learning_rate"]
    assert out["best_training_spec"]["dataset_uri"] == str(dataset)

    # The best trial trained with its sampled values (the runtime applied the --name=value arguments) ...
    trial = out["best_training_job"]
    used = [json.loads(p.read_text()) for p in (standin.root / "jobs" / trial).rglob("spec.json")]
    assert used and used[0]["learning_rate"] == pytest.approx(best["learning_rate"]), used
    assert used[0]["warmup_ratio"] == best["warmup_ratio"]
    # ... reported the tuned metric to the MLflow run Azure ML gave it (the sweep's source of scores) ...
    workspace = MlflowClient(tracking_uri=standin.tracking_uri)
    history = workspace.get_metric_history(standin.job_mlflow_run(trial), "eval_accuracy")
    assert history and history[-1].value == pytest.approx(out["best_value"])
    # ... while the training itself logged to the pipeline's MLflow server, not the workspace's.
    result = json.loads((datastore / "tuning" / out["job_name"] / trial / "llmops/result.json").read_text())
    logged = MlflowClient(tracking_uri=mlflow_server.url).get_run(result["mlflow_run_id"])
    assert logged.data.metrics["eval_accuracy"] == pytest.approx(out["best_value"])
    assert result["tuned"]["learning_rate"] and not workspace.get_run(standin.job_mlflow_run(trial)).data.params
    model = Path(out["best_model_uri"].removeprefix("file://"))
    assert model.parent.name == trial and (model / "config.json").is_file(), model


def test_a_sweep_azure_ml_cannot_run_is_refused_before_any_call(standin: Any, tmp_path: Path) -> None:
    from airflow_llmops.platforms.azureml.requests import AzureMLConfigError
    from airflow_llmops.specs.tuning import TuningSpec

    platform = _platform(standin)
    calls = len(standin.calls)
    tuning = TuningSpec.parse(
        {
            "training": {"dataset_uri": str(tmp_path)},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
            "sampler": "tpe",
        }
    )
    with pytest.raises(AzureMLConfigError, match=r"learning_rate is log-scaled.*sampler='random'"):
        platform.submit_tuning(tuning, job_name="bayesian-log")
    assert len(standin.calls) == calls

"""``dags/llmops_vertex.py`` end to end under ``dag.test()`` against the Vertex AI stand-in: a two-replica Spot custom
job (the real runtime, a real model), quantize, evaluate, register in MLflow, deploy; then later versions whose
canary passes, and one whose canary breaches its SLO and rolls back through the endpoint's traffic split.

The stand-in (``tests/standins/vertex.py``) answers the real client library's REST calls and Cloud Monitoring's
gRPC ``ListTimeSeries``; custom jobs and deployed models run the real runtime and model server. Cloud Storage is
not emulated: the artifact root and staging are local folders (``file://``), which the adapter accepts for this.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloud_pipeline import Traffic, register_again

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("vertex-pipeline")]

MODEL = "chatterbot-topics-classifier"
ENDPOINT = "chatterbot-topics"


@pytest.fixture(scope="module")
def gcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import os

    from standins.vertex import VertexStandIn

    with VertexStandIn(tmp_path_factory.mktemp("vertex"), container_env={"OMP_NUM_THREADS": "1"}) as standin:
        extra = {
            "project": standin.project,
            "is_anonymous": True,
            "api_endpoint": standin.api_endpoint,
            "transport": "rest",
            "monitoring_endpoint": standin.monitoring_endpoint,
            "monitoring_insecure": True,
        }
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = json.dumps(
            {"conn_type": "google_cloud_platform", "extra": extra}
        )
        try:
            yield standin
        finally:
            os.environ.pop("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", None)
    assert standin.errors == [], standin.errors


def test_llmops_vertex_end_to_end(
    gcp: Any, airflow_db: Path, mlflow_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dags_under_test import load_dag

    from airflow_llmops.platforms import EndpointHandle, get_platform

    staging = (gcp.root / "staging").as_uri()
    for key, value in {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "VERTEX_PROJECT": gcp.project,
        "VERTEX_REGION": gcp.location,
        "VERTEX_IMAGE_URI": "us-docker.pkg.dev/llmops-standin/llmops/runtime:test",
        "VERTEX_STAGING_URI": staging,
        "VERTEX_REQUEST_RESPONSE_LOGGING_URI": "bq://llmops-standin.llmops.request_response",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)

    dag = load_dag("llmops_vertex")
    conf = {
        "dataset_source": "chatterbot://english?topics=ai,food,greetings,money,sports",
        "max_steps": 12,
        "replica_count": 2,
        "use_spot": True,
        "machine_type": "n1-standard-4",
        "quantization_methods": ["torch_dynamic_int8"],
        "max_quality_drop": 100.0,
        "bake_seconds": 0,
    }
    run = dag.test(run_conf=conf)
    assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
    trained = run.get_task_instance("train").xcom_pull(task_ids="train")
    assert trained["metrics"]["eval_accuracy"] > 0 and trained["mlflow_run_id"]
    assert Path(trained["model_uri"].removeprefix("file://"), "model.safetensors").is_file()
    job = gcp.client("job").get_custom_job(
        name=run.get_task_instance("train").xcom_pull(task_ids="train", key="job")["job_id"]
    )
    pools = job.job_spec.worker_pool_specs
    assert [p.replica_count for p in pools] == [1, 1] and job.job_spec.scheduling.strategy.name == "SPOT"
    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    assert deployed["platform"] == "vertex" and deployed["variant"] == f"v{registered['version']}"
    status, body, _ = gcp.predict(ENDPOINT, [{"inputs": "what is your favourite food?"}])
    assert status == 200 and body["predictions"][0]["label"], body

    platform = get_platform("vertex", staging_uri=staging, image_uri="i", region=gcp.location)
    handle = EndpointHandle(platform="vertex", endpoint_name=ENDPOINT)
    test_dag = load_dag("llmops_test_vertex", folder="tests/dags")

    # -- a later version: canary 50 -> 100 judged on Cloud Monitoring numbers from live predictions: passes -------
    uri2 = register_again(mlflow_server.url, MODEL, registered["version"])
    with Traffic(lambda i: gcp.predict(ENDPOINT, [{"inputs": f"do you like pizza {i}?"}])):
        run2 = test_dag.test(run_conf={"model_uri": uri2})
    rolled2 = run2.get_task_instance("rollout").xcom_pull(task_ids="rollout") or {}
    assert run2.state == "success", rolled2
    v2 = rolled2["variant"]
    assert [s["status"] for s in rolled2["steps"]] == ["passed", "passed"] and rolled2["steps"][0]["new"][
        "requests"
    ] >= 4
    assert platform.get_traffic(handle) == {v2: 100.0}  # promoted; the old version undeployed

    # -- the next version answers errors: the canary breaches and the split from before comes back ---------------
    uri3 = register_again(mlflow_server.url, MODEL, registered["version"])
    v3 = f"v{uri3.rsplit('/', 1)[1]}"

    def break_it() -> None:  # as soon as v3 is deployed, its server answers 500s
        for _ in range(600):
            described = platform.describe_endpoint(handle)
            ids = {v["name"]: v["deployed_model_id"] for v in described.get("variants", [])}
            if v3 in ids:
                gcp.fail_deployed_model(gcp.endpoint_id(ENDPOINT), ids[v3], status=500)
                return
            time.sleep(0.2)

    breaker = threading.Thread(target=break_it, daemon=True)
    breaker.start()
    with Traffic(lambda i: gcp.predict(ENDPOINT, [{"inputs": f"do you like pizza {i}?"}])):
        run3 = test_dag.test(run_conf={"model_uri": uri3})
    breaker.join(timeout=5)
    gcp.clear_faults()
    assert run3.state == "failed"
    record = platform.get_rollout_record(ENDPOINT)
    assert record.variant == v3 and record.state == "rolled_back" and "error rate" in record.message, record
    assert platform.get_traffic(handle) == {v2: 100.0}
    assert [v["name"] for v in platform.describe_endpoint(handle)["variants"]] == [v2]

    # -- drift on what the endpoint saw: the servers' request logs shipped to the staging folder (the undeployed
    # versions shipped their last file on the way out), then Vertex's own request-response log exported from BigQuery
    shipped = gcp.root / "staging" / "endpoints" / ENDPOINT / "requests"
    assert sorted(shipped.glob("requests-*.jsonl")), list(shipped.parent.rglob("*"))
    reference = run.get_task_instance("validate").xcom_pull(task_ids="validate")["dataset_uri"]
    drift_dag = load_dag("llmops_test_vertex_drift", folder="tests/dags", module="llmops_test_vertex", attr="drift_dag")
    policy = {"window_minutes": 60, "min_rows": 20, "checks": ["text_descriptors", "prediction"]}
    common = {"reference_uri": reference, "window_end": time.time() + 60, "policy": policy}
    on_log = drift_dag.test(
        run_conf={**common, "request_log_uri": shipped.as_uri(), "artifact_root": (gcp.root / "drift1").as_uri()}
    ).get_task_instance("drift")
    assert on_log.state == "success"
    out = on_log.xcom_pull(task_ids="drift")
    assert out["rows"] >= 20 and out["verdict"] in ("drift", "no_drift"), out  # judged, not "too_few_rows"
    exported = gcp.export_request_response_log(ENDPOINT, gcp.root / "bq-export")
    # A fresh DAG object: dag.test() keeps the first run's conf in the params of the one it ran.
    drift_dag = load_dag("llmops_test_vertex_drift", folder="tests/dags", module="llmops_test_vertex", attr="drift_dag")
    on_vertex = drift_dag.test(
        run_conf={**common, "capture_uri": exported.parent.as_uri(), "artifact_root": (gcp.root / "drift2").as_uri()}
    ).get_task_instance("drift")
    assert on_vertex.state == "success"
    logged = on_vertex.xcom_pull(task_ids="drift")
    assert logged["capture_format"] == "vertex" and logged["rows"] >= 20, logged
    assert logged["verdict"] in ("drift", "no_drift"), logged


def test_tuning_on_vertex_hands_on_the_best_trial(gcp: Any, airflow_db: Path, tmp_path: Path) -> None:
    from conftest import prepare_chatterbot
    from dags_under_test import load_dag

    dataset = prepare_chatterbot(tmp_path / "data", topics="ai,food,greetings,money")
    staging = (tmp_path / "staging").as_uri()
    dag = load_dag("llmops_test_vertex_tune", folder="tests/dags", module="llmops_test_vertex", attr="tune_dag")
    run = dag.test(run_conf={"dataset_uri": str(dataset), "staging_uri": staging, "n_trials": 2})
    ti = run.get_task_instance("tune")
    assert ti.state == "success", gcp.errors
    out = ti.xcom_pull(task_ids="tune")
    job = gcp.client("job").get_hyperparameter_tuning_job(
        name=f"{gcp.parent}/hyperparameterTuningJobs/{gcp.tuning_job_id(out['job_name'])}"
    )
    assert job.state.name == "JOB_STATE_SUCCEEDED" and len(job.trials) == 2
    values = [t["value"] for t in out["trials"]]
    assert len(values) == 2 and out["best_value"] == max(v for v in values if v is not None)
    best = out["best_params"]
    assert 1e-5 <= best["learning_rate"] <= 1e-3 and best["warmup_ratio"] in (0.0, 0.1)
    assert out["best_training_spec"]["learning_rate"] == best["learning_rate"]
    assert out["best_training_spec"]["dataset_uri"] == str(dataset)
    # The best trial's container trained with its values (the runtime applied the --name=value arguments) and
    # its model is under <base_output_directory>/<trial id>/model.
    trial = next(t for t in out["trials"] if t["training_job"] == out["best_training_job"])
    used = [json.loads(p.read_text()) for p in gcp.replica_folder(trial["training_job"]).rglob("spec.json")]
    assert used and used[0]["learning_rate"] == pytest.approx(best["learning_rate"]), used
    assert used[0]["warmup_ratio"] == best["warmup_ratio"]
    model = Path(out["best_model_uri"].removeprefix("file://"))
    assert model.parent.name == trial["trial"] and (model / "config.json").is_file(), model


def test_an_api_refusal_names_the_call_and_the_resource_and_is_not_retried(gcp: Any, tmp_path: Path) -> None:
    from conftest import prepare_chatterbot

    from airflow_llmops.platforms import PlatformRefusedError, get_platform
    from airflow_llmops.specs import TrainingSpec

    dataset = prepare_chatterbot(tmp_path / "data")
    platform = get_platform(
        "vertex", project="someone-elses-project", staging_uri=(tmp_path / "s").as_uri(), image_uri="i"
    )
    with pytest.raises(PlatformRefusedError) as refused:  # a ValueError: the operators fail without a retry
        platform.submit_training(TrainingSpec.parse({"dataset_uri": str(dataset)}), job_name="refused-job")
    message = str(refused.value)
    assert "list_custom_jobs" in message and "projects/someone-elses-project/locations/us-central1" in message
    assert "Permission denied on resource project" in message and isinstance(refused.value, ValueError)

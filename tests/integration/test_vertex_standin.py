"""The Vertex AI stand-in (tests/standins/vertex.py) driven by the real client library: ``aiplatform_v1``'s GAPIC
clients over REST and ``monitoring_v3``'s MetricServiceClient over gRPC. Custom jobs run the real runtime
(``python -m airflow_llmops.ml.runtime train``) on two replicas, fail with the runtime's reason, are cancelled and
survive a Spot preemption; two uploaded models are deployed to one endpoint (``... runtime serve``) at 70/30,
predictions follow the split and show up in Cloud Monitoring per deployed model; traffic moves, models are
undeployed, and misspelled fields are 400s."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import prepare_chatterbot, require_module

require_module("google.cloud.aiplatform_v1")
require_module("google.cloud.monitoring_v3")
require_module("grpc")
require_module("transformers")
require_module("fastapi")

from google.api_core import exceptions  # noqa: E402
from google.cloud import aiplatform_v1, monitoring_v3  # noqa: E402
from google.protobuf import duration_pb2, field_mask_pb2  # noqa: E402
from standins.vertex import (  # noqa: E402
    ERROR_COUNT,
    PREDICTION_COUNT,
    PREDICTION_LATENCIES,
    VertexStandIn,
)

# One worker runs the whole module, in order: its tests share one stand-in, and the endpoint tests build on each
# other (the split, then a failing model, then new traffic and undeployment).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("vertex-standin")]

IMAGE = "us-docker.pkg.dev/llmops-standin/llmops/runtime:test"
JobState = aiplatform_v1.JobState


# -- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vertex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VertexStandIn]:
    env = {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with VertexStandIn(tmp_path_factory.mktemp("vertex"), container_env=env, seed=7) as standin:
        yield standin


@pytest.fixture(autouse=True)
def _no_clock_errors(vertex: VertexStandIn) -> Iterator[None]:
    yield
    assert vertex.errors == [], "\n".join(vertex.errors)


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return prepare_chatterbot(tmp_path_factory.mktemp("data") / "chatterbot").as_uri()


def spec_json(**overrides: Any) -> str:
    from airflow_llmops.specs import TrainingSpec

    values: dict[str, Any] = {
        "max_steps": 6,
        "per_device_batch_size": 8,
        "max_seq_length": 32,
        "checkpoint_every_steps": 3,
        "log_every_steps": 1,
        "distributed": {"nproc_per_node": 1},
    }
    return TrainingSpec.parse({**values, **overrides}).to_json()


def custom_job(
    display_name: str,
    output: Path,
    dataset_uri: str,
    spec: str,
    *,
    replicas: tuple[int, ...] = (1,),
    strategy: str = "SPOT",
    labels: dict[str, str] | None = None,
) -> aiplatform_v1.CustomJob:
    """Our runtime image in each pool (workerpool0 holds the primary replica: always 1)."""
    pools = [
        aiplatform_v1.WorkerPoolSpec(
            machine_spec=aiplatform_v1.MachineSpec(machine_type="n1-standard-4"),
            replica_count=count,
            container_spec=aiplatform_v1.ContainerSpec(
                image_uri=IMAGE,
                env=[
                    aiplatform_v1.EnvVar(name="LLMOPS_SPEC", value=spec),
                    aiplatform_v1.EnvVar(name="LLMOPS_DATASET_URI", value=dataset_uri),
                ],
            ),
        )
        for count in replicas
    ]
    return aiplatform_v1.CustomJob(
        display_name=display_name,
        labels=labels or {},
        job_spec=aiplatform_v1.CustomJobSpec(
            worker_pool_specs=pools,
            base_output_directory=aiplatform_v1.GcsDestination(output_uri_prefix=output.as_uri()),
            scheduling=aiplatform_v1.Scheduling(strategy=aiplatform_v1.Scheduling.Strategy[strategy]),
        ),
    )


def create(vertex: VertexStandIn, job: aiplatform_v1.CustomJob) -> aiplatform_v1.CustomJob:
    return vertex.client("job").create_custom_job(parent=vertex.parent, custom_job=job)


def follow(vertex: VertexStandIn, name: str, timeout: float = 300) -> tuple[aiplatform_v1.CustomJob, list[str]]:
    """Poll GetCustomJob until the job ends: (the job, the states seen in order)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        job = vertex.client("job").get_custom_job(name=name)
        state = JobState(job.state).name
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
            return job, seen
        assert time.monotonic() < deadline, f"{name} still {state} after {timeout}s: {seen}\n{logs_of(vertex, name)}"
        time.sleep(0.25)


def logs_of(vertex: VertexStandIn, name: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in vertex.job_log_files(name))


@contextlib.contextmanager
def refused(status: str, match: str) -> Iterator[None]:
    """A REST call Vertex refuses with HTTP 400 (the REST client raises BadRequest whatever the google.rpc status,
    as against Vertex) whose error JSON carries ``status``."""
    with pytest.raises(exceptions.BadRequest, match=match) as err:
        yield
    assert err.value.response.json()["error"]["status"] == status


def processes_under(folder: Path, timeout: float = 20) -> list[str]:
    """Command lines of live processes that run in ``folder`` or name it, once none is left or ``timeout`` passed."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline", "status", "cwd"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            inside = str(proc.info["cwd"] or "").startswith(str(folder))
            if (inside or str(folder) in cmdline) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(cmdline)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


# -- custom jobs -----------------------------------------------------------------------------------------------------


def test_a_failing_job_fails_with_the_runtime_reason_first(vertex, dataset_uri, tmp_path):
    created = create(vertex, custom_job("standin-train-bad", tmp_path, dataset_uri, json.dumps({"max_steps": "many"})))
    done, _ = follow(vertex, created.name, timeout=120)

    assert done.state == JobState.JOB_STATE_FAILED
    assert done.error.code == 3
    reason, _, rest = done.error.message.partition("\n")
    assert "LLMOPS_SPEC" in reason and "max_steps" in reason, done.error.message
    assert rest.startswith("The replica workerpool0-0 exited with a non-zero status of 2."), done.error.message
    assert "[llmops-failure]" in rest  # the last log lines follow
    assert not (tmp_path / "model").exists()


def test_cancel_stops_the_replicas(vertex, dataset_uri, tmp_path):
    spec = spec_json(max_steps=100_000, checkpoint_every_steps=100_000)
    created = create(vertex, custom_job("standin-train-cancel", tmp_path, dataset_uri, spec, strategy="STANDARD"))
    with pytest.raises(ValueError, match="only SPOT VMs are preempted"):
        vertex.preempt(created.name)
    deadline = time.monotonic() + 120
    while "torch.distributed.run" not in logs_of(vertex, created.name):  # the runtime has started torchrun
        assert time.monotonic() < deadline, logs_of(vertex, created.name)
        time.sleep(0.2)
    time.sleep(1)

    jobs = vertex.client("job")
    jobs.cancel_custom_job(name=created.name)
    assert jobs.get_custom_job(name=created.name).state == JobState.JOB_STATE_CANCELLING
    done, _ = follow(vertex, created.name, timeout=120)

    assert done.state == JobState.JOB_STATE_CANCELLED
    assert (done.error.code, done.error.message) == (1, "CANCELED")
    assert "got SIGTERM" in logs_of(vertex, created.name)  # the runtime was told, and stopped torchrun
    assert processes_under(vertex.root / "jobs" / created.name.rsplit("/", 1)[-1]) == []
    with refused("FAILED_PRECONDITION", match="JOB_STATE_CANCELLED"):
        jobs.cancel_custom_job(name=created.name)


def test_a_spot_preemption_restarts_the_replicas_from_the_checkpoint(vertex, dataset_uri, tmp_path):
    # LoRA: small checkpoints, one every 20 steps
    spec = spec_json(max_steps=60, checkpoint_every_steps=20, lora={"r": 4})
    created = create(vertex, custom_job("standin-train-spot", tmp_path, dataset_uri, spec))
    # The VMs go as soon as AIP_CHECKPOINT_DIR holds a whole checkpoint.
    vertex.preempt(created.name, after_checkpoint=True, timeout=240)
    assert vertex.client("job").get_custom_job(name=created.name).state == JobState.JOB_STATE_RUNNING
    done, _ = follow(vertex, created.name)

    assert done.state == JobState.JOB_STATE_SUCCEEDED, f"{done.error.message}\n{logs_of(vertex, created.name)}"
    files = vertex.job_log_files(created.name)
    assert [p.name for p in files] == ["workerpool0-0.attempt1.log", "workerpool0-0.attempt2.log"]
    assert "the Spot VM was preempted" in files[0].read_text()
    resumed = [
        int(m.group(1))
        for line in files[1].read_text().splitlines()
        if (m := re.search(r"resuming from checkpoint .* \(step (\d+)\)", line))
    ]
    assert resumed and 0 < resumed[0] < 60, logs_of(vertex, created.name)
    assert (tmp_path / "model" / "adapter_config.json").is_file() or any((tmp_path / "model").glob("*.safetensors"))


# -- models, endpoints, predictions, monitoring --------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(vertex: VertexStandIn) -> dict[str, str]:
    """Two uploads of a tiny classifier (``artifact_uri``: its local folder): display name -> resource name."""
    from test_serving_models import build_classifier

    folder = build_classifier()
    names = {}
    for variant in ("clf-a", "clf-b"):
        model = aiplatform_v1.Model(
            display_name=variant,
            labels={"llmops-model": "clf"},
            artifact_uri=folder.as_uri(),
            container_spec=aiplatform_v1.ModelContainerSpec(
                image_uri=IMAGE,
                env=[aiplatform_v1.EnvVar(name="LLMOPS_VARIANT_NAME", value=variant)],
                ports=[aiplatform_v1.Port(container_port=8080)],
            ),
        )
        operation = vertex.client("model").upload_model(parent=vertex.parent, model=model)
        names[variant] = operation.result(timeout=60).model
    return names


def deploy(vertex: VertexStandIn, endpoint: str, model: str, split: dict[str, int]) -> aiplatform_v1.DeployedModel:
    deployed = aiplatform_v1.DeployedModel(
        model=model,
        dedicated_resources=aiplatform_v1.DedicatedResources(
            machine_spec=aiplatform_v1.MachineSpec(machine_type="n1-standard-2"),
            min_replica_count=1,
            max_replica_count=2,
            autoscaling_metric_specs=[
                aiplatform_v1.AutoscalingMetricSpec(
                    metric_name="aiplatform.googleapis.com/prediction/online/cpu/utilization", target=70
                )
            ],
        ),
    )
    operation = vertex.client("endpoint").deploy_model(endpoint=endpoint, deployed_model=deployed, traffic_split=split)
    return operation.result(timeout=300).deployed_model


@pytest.fixture(scope="module")
def endpoint(vertex: VertexStandIn, models: dict[str, str]) -> dict[str, str]:
    """An endpoint with clf-a and clf-b deployed at 70/30: {"name", "id", "a", "b"} (deployed model ids)."""
    client = vertex.client("endpoint")
    created = client.create_endpoint(
        parent=vertex.parent,
        endpoint=aiplatform_v1.Endpoint(display_name="standin-ab", labels={"llmops-pipeline": "demo"}),
    ).result(timeout=60)
    a = deploy(vertex, created.name, models["clf-a"], {"0": 100})
    b = deploy(vertex, created.name, models["clf-b"], {a.id: 70, "0": 30})
    return {"name": created.name, "id": created.name.rsplit("/", 1)[-1], "a": a.id, "b": b.id}


def series(
    vertex: VertexStandIn, metric_filter: str, start: datetime, aggregation: monitoring_v3.Aggregation | None = None
) -> list[monitoring_v3.TimeSeries]:
    interval = monitoring_v3.TimeInterval(start_time=start, end_time=datetime.now(timezone.utc) + timedelta(seconds=1))
    request = monitoring_v3.ListTimeSeriesRequest(
        name=f"projects/{vertex.project}", filter=metric_filter, interval=interval
    )
    if aggregation is not None:
        request.aggregation = aggregation
    return list(vertex.client("metric").list_time_series(request=request))


def test_two_models_share_an_endpoint_by_the_traffic_split_and_monitoring_counts_them(vertex, endpoint, models):
    got = vertex.client("endpoint").get_endpoint(name=endpoint["name"])
    assert dict(got.traffic_split) == {endpoint["a"]: 70, endpoint["b"]: 30}
    assert [(d.id, d.display_name, d.model) for d in got.deployed_models] == [
        (endpoint["a"], "clf-a", models["clf-a"]),
        (endpoint["b"], "clf-b", models["clf-b"]),
    ]
    refs = vertex.client("model").get_model(name=models["clf-a"]).deployed_models
    assert [(r.endpoint, r.deployed_model_id) for r in refs] == [(endpoint["name"], endpoint["a"])]
    listed = vertex.client("endpoint").list_endpoints(
        request={"parent": vertex.parent, "filter": 'labels.llmops-pipeline="demo"'}
    )
    assert [e.name for e in listed] == [endpoint["name"]]

    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    counts: Counter[str] = Counter()
    for i in range(60):
        status, body, deployed_model_id = vertex.predict("standin-ab", [{"text": f"hello number {i}"}])
        assert status == 200, body
        assert body["deployedModelId"] == deployed_model_id and len(body["predictions"]) == 1, body
        counts[deployed_model_id] += 1
    assert set(counts) <= {endpoint["a"], endpoint["b"]}
    assert 30 <= counts[endpoint["a"]] <= 54, counts

    # The real client reads the answer: predictions, the deployed model and its model.
    answer = vertex.client("prediction").predict(
        endpoint=endpoint["name"], instances=["good morning, nice to meet you"]
    )
    assert answer.deployed_model_id in counts and answer.model in models.values() and len(answer.predictions) == 1
    counts[answer.deployed_model_id] += 1

    # Cloud Monitoring: one raw point per prediction, per deployed model (filters with and without spaces).
    for dmid, n in counts.items():
        found = series(
            vertex,
            f'metric.type = "{PREDICTION_COUNT}" AND resource.labels.endpoint_id = "{endpoint["id"]}" '
            f'AND metric.labels.deployed_model_id="{dmid}"',
            start,
        )
        assert [dict(s.metric.labels) for s in found] == [{"deployed_model_id": dmid, "response_code": "200"}]
        assert found[0].resource.type == "aiplatform.googleapis.com/Endpoint"
        assert dict(found[0].resource.labels) == {
            "resource_container": vertex.project,
            "location": vertex.location,
            "endpoint_id": endpoint["id"],
        }
        assert sum(p.value.int64_value for p in found[0].points) == len(found[0].points) == n
    # ALIGN_SUM + REDUCE_SUM by deployed model: one point each, the count.
    aggregation = monitoring_v3.Aggregation(
        alignment_period=duration_pb2.Duration(seconds=3600),
        per_series_aligner=monitoring_v3.Aggregation.Aligner.ALIGN_SUM,
        cross_series_reducer=monitoring_v3.Aggregation.Reducer.REDUCE_SUM,
        group_by_fields=["metric.labels.deployed_model_id"],
    )
    summed = series(vertex, f'metric.type="{PREDICTION_COUNT}" AND resource.label.endpoint_id="{endpoint["id"]}"',
                    start, aggregation)  # fmt: skip
    assert {s.metric.labels["deployed_model_id"]: [p.value.int64_value for p in s.points] for s in summed} == {
        dmid: [n] for dmid, n in counts.items()
    }
    latencies = series(
        vertex, f'metric.type = "{PREDICTION_LATENCIES}" AND metric.labels.latency_type = "total"', start
    )
    assert {s.metric.labels["deployed_model_id"]: len(s.points) for s in latencies} == dict(counts)
    assert all(p.value.distribution_value.count == 1 for s in latencies for p in s.points)
    assert series(vertex, f'metric.type = "{ERROR_COUNT}"', start) == []


def test_a_failing_deployed_model_answers_errors_that_monitoring_counts(vertex, endpoint):
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    vertex.fail_deployed_model(endpoint["id"], endpoint["b"], status=500)
    outcomes: Counter[tuple[str | None, int]] = Counter()
    for i in range(30):
        status, body, deployed_model_id = vertex.predict(endpoint["id"], [f"text {i}"])
        outcomes[(deployed_model_id, status)] += 1
        if status != 200:
            assert body["error"]["code"] == 500 and body["error"]["status"] == "INTERNAL", body
            assert "fault injected" in body["error"]["message"]
    vertex.clear_faults()
    assert set(outcomes) <= {(endpoint["a"], 200), (endpoint["b"], 500)}, outcomes
    failures = outcomes[(endpoint["b"], 500)]
    assert failures > 0, outcomes

    errors = series(vertex, f'metric.type = "{ERROR_COUNT}"', start)
    assert [(dict(s.metric.labels), len(s.points)) for s in errors] == [
        ({"deployed_model_id": endpoint["b"]}, failures)
    ]
    by_code = series(vertex, f'metric.type = "{PREDICTION_COUNT}" AND metric.label.response_code = "500"', start)
    assert [len(s.points) for s in by_code] == [failures]


def test_traffic_moves_and_models_are_undeployed_as_vertex_allows(vertex, endpoint, models):
    client = vertex.client("endpoint")
    mask = field_mask_pb2.FieldMask(paths=["traffic_split"])
    a, b = endpoint["a"], endpoint["b"]
    with refused("INVALID_ARGUMENT", match="must be 100"):
        client.update_endpoint(endpoint=aiplatform_v1.Endpoint(name=endpoint["name"], traffic_split={a: 50, b: 40}),
                               update_mask=mask)  # fmt: skip
    updated = client.update_endpoint(
        endpoint=aiplatform_v1.Endpoint(name=endpoint["name"], traffic_split={a: 0, b: 100}), update_mask=mask
    )
    assert dict(updated.traffic_split) == {a: 0, b: 100}
    assert {vertex.predict(endpoint["id"], ["hi"])[2] for _ in range(10)} == {b}

    # Vertex refuses: undeploying the model with all the traffic while another stays, deleting a deployed model or
    # an endpoint with models.
    with refused("FAILED_PRECONDITION", match="100%"):
        client.undeploy_model(endpoint=endpoint["name"], deployed_model_id=b)
    with refused("FAILED_PRECONDITION", match="deployed"):
        vertex.client("model").delete_model(name=models["clf-a"])
    with refused("FAILED_PRECONDITION", match="deployed models"):
        client.delete_endpoint(name=endpoint["name"])

    server_folder = vertex.root / "serving" / endpoint["id"] / a
    client.undeploy_model(endpoint=endpoint["name"], deployed_model_id=a).result(timeout=60)
    got = client.get_endpoint(name=endpoint["name"])
    assert [d.id for d in got.deployed_models] == [b] and dict(got.traffic_split) == {b: 100}
    assert processes_under(server_folder) == []  # clf-a's server was stopped
    assert vertex.client("model").get_model(name=models["clf-a"]).deployed_models == []

    client.undeploy_model(endpoint=endpoint["name"], deployed_model_id=b).result(timeout=60)  # the last one
    got = client.get_endpoint(name=endpoint["name"])
    assert list(got.deployed_models) == [] and dict(got.traffic_split) == {}
    status, body, deployed_model_id = vertex.predict(endpoint["id"], ["anyone there?"])
    assert (status, body["error"]["status"], deployed_model_id) == (400, "FAILED_PRECONDITION", None)

    client.delete_endpoint(name=endpoint["name"]).result(timeout=60)
    with pytest.raises(exceptions.NotFound):
        client.get_endpoint(name=endpoint["name"])
    vertex.client("model").delete_model(name=models["clf-a"]).result(timeout=60)
    assert [m.display_name for m in vertex.client("model").list_models(parent=vertex.parent)] == ["clf-b"]


# -- validation ------------------------------------------------------------------------------------------------------


def post(vertex: VertexStandIn, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{vertex.api_endpoint}/v1/{vertex.parent}/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_misspelled_field_is_a_400_and_invalid_requests_are_refused(vertex, dataset_uri, tmp_path):
    pool = {"machineSpec": {"machineType": "n1-standard-4"}, "replicaCont": 1, "containerSpec": {"imageUri": IMAGE}}
    status, body = post(vertex, "customJobs", {"displayName": "typo", "jobSpec": {"workerPoolSpecs": [pool]}})
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT" and "replicaCont" in body["error"]["message"]
    status, body = post(vertex, "endpoints/1:deployModel", {"deployedModel": {"modle": "x"}})
    assert status == 400 and "modle" in body["error"]["message"]
    status, body = post(vertex, "models:upload", {"model": {"displayName": "m", "artifactUri": "x", "colour": 1}})
    assert status == 400 and "colour" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{vertex.api_endpoint}/v1/{vertex.parent}/customJobs?filtre=x", timeout=30)
    assert err.value.code == 400 and "filtre" in err.value.read().decode()

    # What Vertex checks: the primary pool has one replica, a job has a display name, labels are lowercase.
    jobs = vertex.client("job")
    two_primaries = custom_job("two-primaries", tmp_path, dataset_uri, spec_json(), replicas=(2,))
    with refused("INVALID_ARGUMENT", match=r"worker_pool_specs\[0\].replica_count"):
        jobs.create_custom_job(parent=vertex.parent, custom_job=two_primaries)
    with refused("INVALID_ARGUMENT", match="display_name"):
        jobs.create_custom_job(parent=vertex.parent, custom_job=custom_job("", tmp_path, dataset_uri, spec_json()))
    with refused("INVALID_ARGUMENT", match="labels"):
        jobs.create_custom_job(
            parent=vertex.parent, custom_job=custom_job("x", tmp_path, dataset_uri, spec_json(), labels={"Run": "1"})
        )
    with refused("INVALID_ARGUMENT", match="filter"):
        list(jobs.list_custom_jobs(request={"parent": vertex.parent, "filter": 'create_time>"2020"'}))

    # Cloud Monitoring: one metric type is required and must exist; alignment periods are at least 60 s.
    start = datetime.now(timezone.utc) - timedelta(minutes=5)
    with pytest.raises(exceptions.InvalidArgument, match="metric type"):
        series(vertex, 'resource.labels.endpoint_id = "1"', start)
    with pytest.raises(exceptions.NotFound, match="prediction_cuont"):
        series(vertex, 'metric.type = "aiplatform.googleapis.com/prediction/online/prediction_cuont"', start)
    short = monitoring_v3.Aggregation(
        alignment_period=duration_pb2.Duration(seconds=10),
        per_series_aligner=monitoring_v3.Aggregation.Aligner.ALIGN_SUM,
    )
    with pytest.raises(exceptions.InvalidArgument, match="at least 60"):
        series(vertex, f'metric.type = "{PREDICTION_COUNT}"', start, short)

"""The platform conformance suite: what every TrainingPlatform and DeploymentPlatform must do, whatever it runs on.

Each case builds an adapter through the registry (``get_platform``) and says how to send traffic to its endpoints
and what training specs succeed, fail and run long there. ``local`` runs it against real torchrun jobs and real model
servers; each cloud adapter adds a case that runs the same behaviours against its stand-in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import prepare_chatterbot

from airflow_llmops.platforms import (
    DeploymentError,
    DeploymentPlatform,
    EndpointHandle,
    JobHandle,
    JobState,
    RolloutRecord,
    TrainingPlatform,
    get_platform,
)
from airflow_llmops.specs import RolloutPlan, TrainingSpec

pytestmark = pytest.mark.integration


def tiny_spec(dataset: str, /, **overrides: Any) -> TrainingSpec:
    """A few steps of training with checkpoints on the way: every platform's job runs the same small work."""
    base = {
        "dataset_uri": dataset,
        "max_steps": 6,
        "per_device_batch_size": 8,
        "max_seq_length": 32,
        "checkpoint_every_steps": 3,
        "log_every_steps": 2,
        "distributed": {"nproc_per_node": 1},
    }
    return TrainingSpec.parse({**base, **overrides})


@dataclass
class Case:
    """One platform under test: how to build its adapter and drive it."""

    name: str
    make: Callable[[Path], Any]
    spec: Callable[..., TrainingSpec]
    model_uri: Callable[[], str]
    send: Callable[[EndpointHandle, int], list[int]]  # n requests, their HTTP statuses
    stop: Callable[[Any, str], None]


def _local_case(dataset: Path) -> Case:
    from test_serving_models import build_classifier

    def spec(**overrides: Any) -> TrainingSpec:
        return tiny_spec(str(dataset), **overrides)

    def send(handle: EndpointHandle, n: int) -> list[int]:
        with httpx.Client(base_url=str(handle.url), timeout=30, trust_env=False) as client:
            return [
                client.post("/v1/classify", json={"inputs": f"do you like pizza {i}?"}).status_code for i in range(n)
            ]

    return Case(
        name="local",
        make=lambda root: get_platform("local", jobs_root=str(root / "jobs"), endpoints_root=str(root / "endpoints")),
        spec=spec,
        model_uri=lambda: str(build_classifier()),
        send=send,
        stop=lambda platform, endpoint: platform.stop_endpoint(endpoint),
    )


STANDIN_CONN = "llmops_standin_aws"


def _sagemaker_case(dataset: Path, standin: Any) -> Case:
    """SageMaker against the stand-in: real training containers (the runtime in SageMaker's layout), real model
    servers behind InvokeEndpoint, CloudWatch numbers from real requests."""
    from test_serving_models import build_classifier

    data_uri = standin.upload_folder(dataset, "data/conformance")
    model_uri = standin.upload_model(build_classifier(), "models/conformance/model.tar.gz")
    settings = {
        "aws_conn_id": STANDIN_CONN,
        "role_arn": standin.role_arn,
        "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/airflow-llmops-runtime:test",
        "s3_prefix": standin.s3_uri("llmops"),
        "instance_type": "ml.m5.large",
        "poll_s": 0.2,
        "wait_timeout_s": 300.0,
        "max_attempts": 2,
    }

    def spec(**overrides: Any) -> TrainingSpec:
        if "dataset_uri" in overrides:  # a local path the suite made up: the same name under the bucket, absent
            overrides["dataset_uri"] = standin.s3_uri(f"data/{Path(str(overrides['dataset_uri'])).name}")
        return tiny_spec(data_uri, **overrides)

    def send(handle: EndpointHandle, n: int) -> list[int]:
        return [standin.invoke(handle.endpoint_name, {"inputs": f"do you like pizza {i}?"})[0] for i in range(n)]

    return Case(
        name="sagemaker",
        make=lambda root: get_platform("sagemaker", **settings),
        spec=spec,
        model_uri=lambda: model_uri,
        send=send,
        stop=lambda platform, endpoint: platform.stop_endpoint(endpoint),
    )


GCP_CONN = "llmops_standin_gcp"


def _vertex_case(dataset: Path, standin: Any) -> Case:
    """Vertex AI against its stand-in: the real client library (REST, gRPC for Monitoring), custom jobs running the
    runtime with Vertex's cluster spec, deployed models served by the real model server."""
    from test_serving_models import build_classifier

    model_uri = build_classifier().resolve().as_uri()
    settings = {
        "gcp_conn_id": GCP_CONN,
        "region": standin.location,
        "staging_uri": (standin.root / "staging").as_uri(),
        "image_uri": "us-docker.pkg.dev/llmops-standin/llmops/runtime:test",
        "machine_type": "n1-standard-4",
        "poll_s": 0.2,
        "wait_timeout_s": 300.0,
    }

    def spec(**overrides: Any) -> TrainingSpec:
        return tiny_spec(str(dataset), **overrides)

    def send(handle: EndpointHandle, n: int) -> list[int]:
        return [standin.predict(handle.endpoint_name, [{"inputs": f"do you like pizza {i}?"}])[0] for i in range(n)]

    return Case(
        name="vertex",
        make=lambda root: get_platform("vertex", **settings),
        spec=spec,
        model_uri=lambda: model_uri,
        send=send,
        stop=lambda platform, endpoint: platform.stop_endpoint(endpoint),
    )


def _azureml_case(dataset: Path, standin: Any) -> Case:
    """Azure ML against its stand-in: the real MLClient and MonitorManagementClient over an in-process transport,
    command jobs running the runtime with Azure ML's distributed environment, deployments served by the real model
    server, Azure Monitor numbers from the requests routed."""
    from test_serving_models import build_classifier

    model_uri = build_classifier().resolve().as_uri()
    settings = {
        "subscription_id": standin.subscription_id,
        "resource_group": standin.resource_group,
        "workspace_name": standin.workspace_name,
        "compute": "cpu-cluster",
        "image": "llmops.azurecr.io/llmops/runtime:test",
        "output_uri": (standin.root / "datastore").as_uri(),
        "instance_type": "Standard_DS3_v2",
        "poll_s": 0.2,
        "wait_timeout_s": 300.0,
    }

    def spec(**overrides: Any) -> TrainingSpec:
        return tiny_spec(str(dataset), **overrides)

    def send(handle: EndpointHandle, n: int) -> list[int]:
        return [standin.score(handle.endpoint_name, {"inputs": f"do you like pizza {i}?"})[0] for i in range(n)]

    return Case(
        name="azureml",
        make=lambda root: get_platform("azureml", **settings),
        spec=spec,
        model_uri=lambda: model_uri,
        send=send,
        stop=lambda platform, endpoint: platform.stop_endpoint(endpoint),
    )


@pytest.fixture(scope="module")
def azureml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from standins.azureml import AzureMLStandIn

    with AzureMLStandIn(tmp_path_factory.mktemp("azureml"), container_env={"OMP_NUM_THREADS": "1"}) as standin:
        standin.install()  # the adapter's clients talk to the stand-in (tests-only hook, no connection)
        try:
            yield standin
        finally:
            standin.uninstall()
            assert standin.errors == [], standin.errors


@pytest.fixture(scope="module")
def vertex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import json
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
        conn = {"conn_type": "google_cloud_platform", "extra": extra}
        os.environ[f"AIRFLOW_CONN_{GCP_CONN.upper()}"] = json.dumps(conn)
        try:
            yield standin
        finally:
            os.environ.pop(f"AIRFLOW_CONN_{GCP_CONN.upper()}", None)
            assert standin.errors == [], standin.errors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("conformance-data"), topics="ai,food,greetings,money")


@pytest.fixture(scope="module")
def sagemaker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import json
    import os

    from standins.sagemaker import SageMakerStandIn

    with SageMakerStandIn(tmp_path_factory.mktemp("sagemaker"), container_env={"OMP_NUM_THREADS": "1"}) as standin:
        os.environ[f"AIRFLOW_CONN_{STANDIN_CONN.upper()}"] = json.dumps(standin.connection())
        try:
            yield standin
        finally:
            os.environ.pop(f"AIRFLOW_CONN_{STANDIN_CONN.upper()}", None)
            assert standin.errors == [], standin.errors


@pytest.fixture(scope="module", params=["local", "sagemaker", "vertex", "azureml"])
def case(request: pytest.FixtureRequest, dataset: Path) -> Case:
    if request.param == "azureml":
        return _azureml_case(dataset, request.getfixturevalue("azureml"))
    if request.param == "sagemaker":
        return _sagemaker_case(dataset, request.getfixturevalue("sagemaker"))
    if request.param == "vertex":
        return _vertex_case(dataset, request.getfixturevalue("vertex"))
    return _local_case(dataset)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


def _wait_terminal(platform: TrainingPlatform, handle: JobHandle, timeout: float = 300) -> list[JobState]:
    """Every state seen until the job ends (polled like a trigger would)."""
    seen: list[JobState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = platform.get_training_status(handle).state
        if not seen or seen[-1] is not state:
            seen.append(state)
        if state.is_terminal:
            return seen
        time.sleep(0.5)
    raise TimeoutError(f"{handle.job_name} did not end: {platform.describe_training(handle)}")


# -- training --------------------------------------------------------------------------------------------------------
def test_training_submit_is_idempotent_reattaches_and_ends_in_one_terminal_state(case: Case, root: Path) -> None:
    platform = case.make(root)
    assert isinstance(platform, TrainingPlatform)
    handle = platform.submit_training(case.spec(), job_name="conf-ok")
    assert platform.submit_training(case.spec(), job_name="conf-ok").job_id == handle.job_id
    # The caller crashed: a new adapter object (another process) finds the same job from the handle alone.
    rebuilt = case.make(root)
    assert rebuilt.submit_training(case.spec(), job_name="conf-ok").job_id == handle.job_id
    seen = _wait_terminal(rebuilt, JobHandle.from_dict(handle.to_dict()))
    terminal = [s for s in seen if s.is_terminal]
    assert terminal == [JobState.SUCCEEDED], (seen, platform.describe_training(handle))
    assert all(not s.is_terminal for s in seen[:-1])
    for _ in range(3):  # a terminal state stays terminal
        assert platform.get_training_status(handle).state is JobState.SUCCEEDED
    status = platform.get_training_status(handle)
    assert status.model_uri and status.metrics
    assert platform.submit_training(case.spec(), job_name="conf-ok").job_id == handle.job_id  # not rerun
    assert "status" in platform.describe_training(handle)


def test_a_failed_training_job_says_why(case: Case, root: Path, tmp_path: Path) -> None:
    platform = case.make(root)
    handle = platform.submit_training(case.spec(dataset_uri=str(tmp_path / "no-such-dataset")), job_name="conf-bad")
    seen = _wait_terminal(platform, handle)
    assert seen[-1] is JobState.FAILED, seen
    message = platform.get_training_status(handle).message
    assert "no-such-dataset" in message, message


def test_cancel_ends_a_running_job(case: Case, root: Path) -> None:
    platform = case.make(root)
    handle = platform.submit_training(case.spec(max_steps=2000), job_name="conf-cancel")
    deadline = time.monotonic() + 120
    while platform.get_training_status(handle).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, platform.describe_training(handle)
        time.sleep(0.5)
    platform.cancel_training(handle)
    seen = _wait_terminal(platform, handle, timeout=60)
    assert seen[-1] is JobState.CANCELLED, seen
    time.sleep(1)
    assert platform.get_training_status(handle).state is seen[-1]


# -- deployment ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(case: Case, root: Path) -> Iterator[tuple[Any, EndpointHandle]]:
    platform = case.make(root)
    plan = RolloutPlan.parse({"strategy": "canary", "traffic_steps": [10, 50, 100], "bake_seconds": 0})
    first = platform.deploy("conformance", model_uri=case.model_uri(), variant="v1", plan=plan)
    yield platform, first
    case.stop(platform, "conformance")


def test_deployment_protocol_end_to_end(case: Case, endpoint: tuple[Any, EndpointHandle]) -> None:
    platform, first = endpoint
    assert isinstance(platform, DeploymentPlatform)
    assert platform.get_traffic(first) == {"v1": 100.0}  # the first version takes everything
    plan = RolloutPlan.parse({"strategy": "canary", "traffic_steps": [10, 50, 100], "bake_seconds": 0})

    second = platform.deploy("conformance", model_uri=case.model_uri(), variant="v2", plan=plan)
    assert second.extra["previous"] == {"v1": 100.0}
    assert platform.get_traffic(second) == {"v1": 100.0, "v2": 0.0}  # next to the serving version, at 0 %
    again = platform.deploy("conformance", model_uri=case.model_uri(), variant="v2", plan=plan)
    assert again.extra["previous"] == {"v1": 100.0} and platform.get_traffic(again) == {"v1": 100.0, "v2": 0.0}

    with pytest.raises(ValueError, match="sum to 100"):
        platform.set_traffic(second, {"v1": 80.0, "v2": 10.0})
    assert platform.get_traffic(second) == {"v1": 100.0, "v2": 0.0}  # a refused split changes nothing

    platform.set_traffic(second, {"v1": 50.0, "v2": 50.0})
    assert platform.get_traffic(second) == {"v1": 50.0, "v2": 50.0}
    before = time.time()
    time.sleep(0.05)
    statuses = case.send(second, 40)
    assert statuses == [200] * 40
    rows = {m.variant: m for m in platform.read_metrics(second, variants=["v2", "v1"], since=before)}
    assert rows["v1"].requests + rows["v2"].requests == 40
    assert rows["v1"].requests > 0 and rows["v2"].requests > 0 and rows["v2"].errors == 0
    later = platform.read_metrics(second, variants=["v2", "v1"], since=time.time() + 1)
    assert sum(m.requests for m in later) == 0  # metrics since a time count only what came after it

    platform.rollback(second, failed_variant="v2", previous={"v1": 100.0})
    assert platform.get_traffic(second) == {"v1": 100.0}  # exactly the old weights, the new version gone
    assert case.send(second, 5) == [200] * 5

    third = platform.deploy("conformance", model_uri=case.model_uri(), variant="v3", plan=plan)
    platform.set_traffic(third, {"v1": 90.0, "v3": 10.0})
    platform.finish(third, new_variant="v3")
    assert platform.get_traffic(third) == {"v3": 100.0}  # promoted, the old version unloaded
    described = platform.describe_endpoint(third)
    assert described["weights"] == {"v3": 100.0} and [v["name"] for v in described["variants"]] == ["v3"]


def test_rollout_record_lives_on_the_endpoint(case: Case, root: Path, endpoint: tuple[Any, EndpointHandle]) -> None:
    platform, handle = endpoint
    serving = platform.get_traffic(handle)  # whatever the other tests left serving (they may run elsewhere)
    record = RolloutRecord(rollout_id="dag/run/rollout", variant="v9", model_uri="m", previous=serving, plan={}, step=1)
    platform.put_rollout_record("conformance", record)
    other = case.make(root)  # another process, another adapter object: the record is on the endpoint
    loaded = other.get_rollout_record("conformance")
    assert loaded is not None and loaded.variant == "v9" and loaded.step == 1 and loaded.previous == serving
    loaded.state = "rolled_back"
    other.put_rollout_record("conformance", loaded)
    assert platform.get_rollout_record("conformance").state == "rolled_back"


def test_endpoint_names_that_escape_or_break_paths_are_refused(case: Case, root: Path) -> None:
    platform = case.make(root)
    plan = RolloutPlan.parse({"strategy": "blue_green", "bake_seconds": 0})
    for bad in ("../x", "a/b", "", "x" * 64, "with space", ".hidden"):
        with pytest.raises((DeploymentError, ValueError), match="endpoint_name"):
            platform.deploy(bad, model_uri=case.model_uri(), variant="v1", plan=plan)
    assert not (root / "x").exists() and not (root / "endpoints" / "a").exists()

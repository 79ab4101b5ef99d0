"""The SageMaker stand-in (tests/standins/sagemaker.py) driven with plain boto3: training jobs that run the real
container runtime (``python -m airflow_llmops.ml.runtime train``) on two "instances", fail, stop and survive a spot
interruption; endpoints that serve a real classifier (``... runtime serve``) by the variants' weights, with
CloudWatch metrics, Data Capture files, weight updates and blue/green updates that bake and roll back; hyperparameter
tuning jobs whose trials are such training jobs, judged by the metric their result line prints, failed and stopped."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import prepare_chatterbot, require_module

require_module("moto")
require_module("boto3")
require_module("transformers")
require_module("fastapi")

from standins.sagemaker import SageMakerStandIn  # noqa: E402

# One worker runs the whole module, in order: its tests share one stand-in and the endpoint tests build on each
# other (weights, then a blue/green update to ab-2, then a rolled-back one that must leave ab-2 in place).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("sagemaker-standin")]

ENDPOINT = "standin-ab"
CAPTURE_PREFIX = "capture"


# -- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SageMakerStandIn]:
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": ""}
    with SageMakerStandIn(tmp_path_factory.mktemp("sagemaker"), container_env=env, seed=7) as standin:
        yield standin


@pytest.fixture(autouse=True)
def _no_clock_errors(sm: SageMakerStandIn) -> Iterator[None]:
    yield
    assert sm.errors == [], "\n".join(sm.errors)


@pytest.fixture(scope="module")
def dataset_uri(sm: SageMakerStandIn, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = prepare_chatterbot(tmp_path_factory.mktemp("data") / "chatterbot")
    return sm.upload_folder(folder, "datasets/chatterbot")


@pytest.fixture(scope="module")
def model_uri(sm: SageMakerStandIn) -> str:
    from test_serving_models import build_classifier

    return sm.upload_model(build_classifier(), "models/classifier/model.tar.gz")


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


def create_training_job(
    sm: SageMakerStandIn, name: str, dataset_uri: str, *, spec: str, instances: int = 1, **extra: Any
) -> None:
    sm.client("sagemaker").create_training_job(
        TrainingJobName=name,
        AlgorithmSpecification={
            "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops:test",
            "TrainingInputMode": "File",
        },
        RoleArn=sm.role_arn,
        HyperParameters={"llmops_spec": spec},
        InputDataConfig=[
            {
                "ChannelName": "dataset",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": dataset_uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        OutputDataConfig={"S3OutputPath": sm.s3_uri("output")},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": instances, "VolumeSizeInGB": 10},
        CheckpointConfig={"S3Uri": sm.s3_uri(f"checkpoints/{name}")},
        StoppingCondition=extra.pop("StoppingCondition", {"MaxRuntimeInSeconds": 900}),
        **extra,
    )


def follow_training(
    sm: SageMakerStandIn, name: str, timeout: float = 300
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Poll until the job ends: (its last description, the (status, secondary status) pairs seen in order)."""
    client = sm.client("sagemaker")
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        desc = client.describe_training_job(TrainingJobName=name)
        pair = (desc["TrainingJobStatus"], desc["SecondaryStatus"])
        if not seen or seen[-1] != pair:
            seen.append(pair)
        if pair[0] in ("Completed", "Failed", "Stopped"):
            return desc, seen
        assert time.monotonic() < deadline, f"{name} still {pair} after {timeout}s: {seen}\n{logs_of(sm, name)}"
        time.sleep(0.25)


def logs_of(sm: SageMakerStandIn, name: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sm.training_logs(name))


def s3_keys(sm: SageMakerStandIn, prefix: str) -> list[str]:
    pages = sm.client("s3").get_paginator("list_objects_v2").paginate(Bucket=sm.bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def read_s3(sm: SageMakerStandIn, uri: str) -> bytes:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return sm.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def stream_messages(sm: SageMakerStandIn, group: str, stream: str) -> list[str]:
    events = sm.client("logs").get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)
    return [e["message"] for e in events["events"]]


# -- training --------------------------------------------------------------------------------------------------------


def test_a_bad_training_job_fails_with_a_reason_that_names_the_problem(sm, dataset_uri):
    name = "standin-train-bad"
    create_training_job(sm, name, dataset_uri, spec=json.dumps({"max_steps": "many"}))
    desc, seen = follow_training(sm, name, timeout=120)

    assert desc["TrainingJobStatus"] == "Failed"
    assert desc["SecondaryStatus"] == "Failed"
    assert desc["FailureReason"].startswith("AlgorithmError: ")
    assert "llmops_spec" in desc["FailureReason"] and "max_steps" in desc["FailureReason"]
    assert "ModelArtifacts" not in desc
    assert ("InProgress", "Training") in seen or ("InProgress", "Downloading") in seen


def processes_under(folder: Path, timeout: float = 20) -> list[str]:
    """Command lines of live processes that run in ``folder`` or name it (a container's runtime, torchrun and its
    workers, a model server), once none is left or ``timeout`` has passed."""
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


def test_stop_training_job_stops_the_containers(sm, dataset_uri):
    from botocore.exceptions import ClientError

    name = "standin-train-stop"
    create_training_job(sm, name, dataset_uri, spec=spec_json(max_steps=100_000, checkpoint_every_steps=100_000))
    client = sm.client("sagemaker")
    deadline = time.monotonic() + 120
    while "torch.distributed.run" not in logs_of(sm, name):  # the runtime has started torchrun
        assert client.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "InProgress"
        assert time.monotonic() < deadline, logs_of(sm, name)
        time.sleep(0.2)
    time.sleep(1)

    client.stop_training_job(TrainingJobName=name)
    desc = client.describe_training_job(TrainingJobName=name)
    assert (desc["TrainingJobStatus"], desc["SecondaryStatus"]) == ("Stopping", "Stopping")
    desc, _ = follow_training(sm, name, timeout=120)

    assert (desc["TrainingJobStatus"], desc["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert [t["Status"] for t in desc["SecondaryStatusTransitions"]][-2:] == ["Stopping", "Stopped"]
    assert "got SIGTERM" in logs_of(sm, name)  # the runtime was told, and forwarded it to torchrun
    assert processes_under(sm.training_root(name)) == []
    with pytest.raises(ClientError, match="ValidationException"):
        client.stop_training_job(TrainingJobName=name)


def test_max_runtime_stops_the_job_as_max_runtime_exceeded(sm, dataset_uri):
    name = "standin-train-max-runtime"
    create_training_job(
        sm,
        name,
        dataset_uri,
        spec=spec_json(max_steps=100_000, checkpoint_every_steps=100_000),
        StoppingCondition={"MaxRuntimeInSeconds": 3},
    )
    desc, seen = follow_training(sm, name, timeout=120)
    assert (desc["TrainingJobStatus"], desc["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded"), seen
    assert ("Stopping", "Stopping") in seen
    assert processes_under(sm.training_root(name)) == []


def test_a_spot_interruption_restarts_the_job_from_its_s3_checkpoint(sm, dataset_uri):
    name = "standin-train-spot"
    create_training_job(
        sm,
        name,
        dataset_uri,
        # LoRA: small checkpoints; one every 20 steps leaves the clock quiet moments to take a whole one
        spec=spec_json(max_steps=60, checkpoint_every_steps=20, lora={"r": 4}),
        EnableManagedSpotTraining=True,
        StoppingCondition={"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 1800},
    )
    client = sm.client("sagemaker")
    sm.interrupt_training(name, after_checkpoint=True)  # as soon as S3 holds a whole checkpoint
    assert any(k.endswith("trainer_state.json") for k in s3_keys(sm, f"checkpoints/{name}/"))
    desc = client.describe_training_job(TrainingJobName=name)
    assert (desc["TrainingJobStatus"], desc["SecondaryStatus"]) == ("InProgress", "Interrupted")
    desc, _ = follow_training(sm, name)

    assert desc["TrainingJobStatus"] == "Completed", f"{desc.get('FailureReason')}\n{logs_of(sm, name)}"
    transitions = [t["Status"] for t in desc["SecondaryStatusTransitions"]]
    i = transitions.index("Interrupted")
    assert transitions[:i] == ["Starting", "Downloading", "Training"]
    assert transitions[i:] == ["Interrupted", "Restarting", "Downloading", "Training", "Uploading", "Completed"]

    # The second attempt resumed from the checkpoint restored from S3: its own log stream and status say so.
    streams = sorted(
        s["logStreamName"]
        for s in sm.client("logs").describe_log_streams(
            logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix=f"{name}/"
        )["logStreams"]
    )
    assert len(streams) == 2, streams
    resumed = [
        int(m.group(1))
        for line in stream_messages(sm, "/aws/sagemaker/TrainingJobs", streams[1])
        if (m := re.search(r"resuming from checkpoint .* \(step (\d+)\)", line))
    ]
    assert resumed and 0 < resumed[0] < 60, logs_of(sm, name)
    with tarfile.open(fileobj=io.BytesIO(read_s3(sm, sm.s3_uri(f"output/{name}/output/output.tar.gz")))) as tar:
        status = json.load(tar.extractfile("status.json"))  # type: ignore[arg-type]
    assert status["resumed_from_step"] == resumed[0]


# -- endpoints --------------------------------------------------------------------------------------------------------


def create_model(sm: SageMakerStandIn, name: str, model_uri: str) -> None:
    sm.client("sagemaker").create_model(
        ModelName=name,
        ExecutionRoleArn=sm.role_arn,
        PrimaryContainer={
            "Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops:test",
            "ModelDataUrl": model_uri,
            "Environment": {"LLMOPS_VARIANT_NAME": name},
        },
    )


def variant(name: str, model: str, weight: float) -> dict[str, Any]:
    return {
        "VariantName": name,
        "ModelName": model,
        "InitialVariantWeight": weight,
        "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1,
    }


def weights_of(desc: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {v["VariantName"]: (v["CurrentWeight"], v["DesiredWeight"]) for v in desc["ProductionVariants"]}


def invoke_many(sm: SageMakerStandIn, n: int, endpoint: str = ENDPOINT) -> Counter[tuple[str, int]]:
    return Counter(
        (variant, status)
        for status, _, variant in (sm.invoke(endpoint, {"inputs": f"hello number {i}"}) for i in range(n))
    )


def metric_sum(sm: SageMakerStandIn, metric: str, variant_name: str, start: datetime, stat: str = "Sum") -> float:
    answer = sm.client("cloudwatch").get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/SageMaker",
                        "MetricName": metric,
                        "Dimensions": [
                            {"Name": "EndpointName", "Value": ENDPOINT},
                            {"Name": "VariantName", "Value": variant_name},
                        ],
                    },
                    "Period": 60,
                    "Stat": stat,
                },
            }
        ],
        StartTime=start - timedelta(minutes=2),
        EndTime=datetime.now(timezone.utc) + timedelta(minutes=1),
    )
    return float(sum(answer["MetricDataResults"][0]["Values"]))


@pytest.fixture(scope="module")
def endpoint(sm: SageMakerStandIn, model_uri: str) -> str:
    """An endpoint with two variants at 70/30 and Data Capture on (JSON kept as text)."""
    client = sm.client("sagemaker")
    for model in ("clf-a", "clf-b", "clf-c", "clf-d"):
        create_model(sm, model, model_uri)
    client.create_endpoint_config(
        EndpointConfigName="ab-1",
        ProductionVariants=[variant("blue", "clf-a", 0.7), variant("green", "clf-b", 0.3)],
        DataCaptureConfig={
            "EnableCapture": True,
            "InitialSamplingPercentage": 100,
            "DestinationS3Uri": sm.s3_uri(CAPTURE_PREFIX),
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        },
    )
    client.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="ab-1")
    assert client.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Creating"
    desc = sm.wait_endpoint(ENDPOINT)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    return ENDPOINT


def test_invocations_split_by_weight_with_metrics_and_data_capture(sm, endpoint):
    desc = sm.client("sagemaker").describe_endpoint(EndpointName=endpoint)
    assert weights_of(desc) == {"blue": (0.7, 0.7), "green": (0.3, 0.3)}
    assert desc["DataCaptureConfig"]["EnableCapture"] and desc["DataCaptureConfig"]["CaptureStatus"] == "Started"
    start = datetime.now(timezone.utc)

    status, body, chosen = sm.invoke(endpoint, {"inputs": "good morning, nice to meet you"})
    assert status == 200 and chosen in ("blue", "green")
    assert isinstance(body, dict), body  # the classifier's JSON answer
    counts = invoke_many(sm, 59)
    counts[(chosen, 200)] += 1
    per_variant = Counter({v: n for (v, s), n in counts.items() if s == 200})
    assert sum(per_variant.values()) == 60, counts
    assert 30 <= per_variant["blue"] <= 54 and per_variant["green"] == 60 - per_variant["blue"], per_variant
    # TargetVariant pins the variant.
    assert sm.invoke(endpoint, {"inputs": "pinned"}, target_variant="green")[2] == "green"
    per_variant["green"] += 1

    for name, n in per_variant.items():
        assert metric_sum(sm, "Invocations", name, start) == n
        assert metric_sum(sm, "Invocation5XXErrors", name, start) == 0
        assert metric_sum(sm, "ModelLatency", name, start, "SampleCount") == n
        assert metric_sum(sm, "ModelLatency", name, start, "Average") > 0

    # Data Capture: SageMaker's JSONL files under <destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/.
    sm.flush_capture()
    for name, n in per_variant.items():
        keys = s3_keys(sm, f"{CAPTURE_PREFIX}/{endpoint}/{name}/")
        assert keys and all(
            re.fullmatch(rf"{CAPTURE_PREFIX}/{endpoint}/{name}/\d{{4}}/\d\d/\d\d/\d\d/[\w-]+\.jsonl", k) for k in keys
        ), keys
        lines = [json.loads(line) for k in keys for line in read_s3(sm, sm.s3_uri(k)).decode().splitlines()]
        assert len(lines) == n
        record = lines[0]
        assert set(record) == {"captureData", "eventMetadata", "eventVersion"} and record["eventVersion"] == "0"
        inp, out = record["captureData"]["endpointInput"], record["captureData"]["endpointOutput"]
        assert inp["mode"] == "INPUT" and inp["encoding"] == "JSON" and inp["observedContentType"] == "application/json"
        assert json.loads(inp["data"])["inputs"]
        assert out["mode"] == "OUTPUT" and out["encoding"] == "JSON" and json.loads(out["data"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["eventMetadata"]["inferenceTime"])
        assert record["eventMetadata"]["eventId"]


def test_a_failing_variant_answers_model_errors_counted_as_5xx(sm, endpoint):
    start = datetime.now(timezone.utc)
    before = metric_sum(sm, "Invocation5XXErrors", "green", start)
    sm.fail_variant(endpoint, "green", status=503)
    try:
        status, body, chosen = sm.invoke(endpoint, {"inputs": "hi"}, target_variant="green")
    finally:
        sm.clear_faults()
    assert (status, chosen) == (503, "green") and body == {"error": "fault injected"}
    assert metric_sum(sm, "Invocation5XXErrors", "green", start) == before + 1
    assert sm.invoke(endpoint, {"inputs": "hi"}, target_variant="green")[0] == 200


def test_update_endpoint_weights_and_capacities_moves_the_weights(sm, endpoint):
    client = sm.client("sagemaker")
    client.update_endpoint_weights_and_capacities(
        EndpointName=endpoint,
        DesiredWeightsAndCapacities=[
            {"VariantName": "blue", "DesiredWeight": 0.1},
            {"VariantName": "green", "DesiredWeight": 0.9},
        ],
    )
    desc = client.describe_endpoint(EndpointName=endpoint)
    assert desc["EndpointStatus"] == "Updating"
    assert weights_of(desc) == {"blue": (0.7, 0.1), "green": (0.3, 0.9)}
    desc = sm.wait_endpoint(endpoint, ["InService"], timeout=30)
    assert weights_of(desc) == {"blue": (0.1, 0.1), "green": (0.9, 0.9)}
    counts = invoke_many(sm, 20)
    assert counts[("green", 200)] >= 14, counts


def put_error_alarm(sm: SageMakerStandIn, name: str) -> None:
    sm.client("cloudwatch").put_metric_alarm(
        AlarmName=name,
        Namespace="AWS/SageMaker",
        MetricName="Invocation5XXErrors",
        Dimensions=[{"Name": "EndpointName", "Value": ENDPOINT}],
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=0,
        ComparisonOperator="GreaterThanThreshold",
    )
    sm.client("cloudwatch").set_alarm_state(AlarmName=name, StateValue="OK", StateReason="test")


def canary(wait: int, alarm: str) -> dict[str, Any]:
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {
                "Type": "CANARY",
                "WaitIntervalInSeconds": wait,
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 50},
            },
            "TerminationWaitInSeconds": 1,
            "MaximumExecutionTimeoutInSeconds": 600,
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": alarm}]},
    }


def invoke_until(sm: SageMakerStandIn, wanted: str, timeout: float = 120) -> Counter[tuple[str, int]]:
    """Invoke until the variant ``wanted`` answers (it only exists in the new fleet, so the canary is live)."""
    seen: Counter[tuple[str, int]] = Counter()
    deadline = time.monotonic() + timeout
    while not any(v == wanted for v, _ in seen):
        assert time.monotonic() < deadline, f"{wanted} never answered: {seen}"
        seen.update(invoke_many(sm, 1))
        time.sleep(0.1)
    return seen


def test_blue_green_update_bakes_a_canary_then_switches_the_config(sm, endpoint):
    client = sm.client("sagemaker")
    put_error_alarm(sm, "standin-errors-ok")
    green_folder = sm.serving_root(endpoint, "green")
    assert green_folder is not None and processes_under(green_folder, timeout=0)  # its server runs
    client.create_endpoint_config(
        EndpointConfigName="ab-2",
        ProductionVariants=[variant("blue", "clf-a", 0.5), variant("canary", "clf-c", 0.5)],
        ShadowProductionVariants=[variant("shadow", "clf-b", 0.5)],  # mirrors half the requests
    )
    deployment = canary(4, "standin-errors-ok")
    client.update_endpoint(EndpointName=endpoint, EndpointConfigName="ab-2", DeploymentConfig=deployment)
    desc = client.describe_endpoint(EndpointName=endpoint)
    assert desc["EndpointStatus"] == "Updating" and desc["EndpointConfigName"] == "ab-1"
    assert desc["PendingDeploymentSummary"]["EndpointConfigName"] == "ab-2"

    seen = invoke_until(sm, "canary")  # during the bake both fleets answer
    assert client.describe_endpoint(EndpointName=endpoint)["EndpointStatus"] == "Updating", seen
    desc = sm.wait_endpoint(endpoint, ["InService"], timeout=120)

    assert desc["EndpointConfigName"] == "ab-2"
    assert desc["LastDeploymentConfig"] == deployment
    assert weights_of(desc) == {"blue": (0.5, 0.5), "canary": (0.5, 0.5)}
    assert "PendingDeploymentSummary" not in desc and "FailureReason" not in desc
    assert [v["VariantName"] for v in desc["ShadowProductionVariants"]] == ["shadow"]
    assert processes_under(green_folder) == []  # the old config's green server is gone

    start = datetime.now(timezone.utc)
    assert {v for v, _ in invoke_many(sm, 12)} <= {"blue", "canary"}  # a shadow never answers
    deadline = time.monotonic() + 30
    while (mirrored := metric_sum(sm, "Invocations", "shadow", start)) == 0:  # mirrored in the background
        assert time.monotonic() < deadline, "no invocation reached the shadow variant"
        time.sleep(0.5)
    assert 1 <= mirrored <= 12


def test_blue_green_update_rolls_back_when_an_alarm_fires_during_the_bake(sm, endpoint):
    client = sm.client("sagemaker")
    put_error_alarm(sm, "standin-errors")
    client.create_endpoint_config(
        EndpointConfigName="ab-3", ProductionVariants=[variant("blue", "clf-a", 0.5), variant("broken", "clf-d", 0.5)]
    )
    sm.fail_variant(endpoint, "broken", status=500)
    try:
        client.update_endpoint(
            EndpointName=endpoint, EndpointConfigName="ab-3", DeploymentConfig=canary(120, "standin-errors")
        )
        seen = invoke_until(sm, "broken")
        assert ("broken", 500) in seen
        sm.client("cloudwatch").set_alarm_state(AlarmName="standin-errors", StateValue="ALARM", StateReason="5xx")
        statuses = []
        deadline = time.monotonic() + 60
        while not statuses or statuses[-1] != "InService":
            assert time.monotonic() < deadline, statuses
            status = client.describe_endpoint(EndpointName=endpoint)["EndpointStatus"]
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            time.sleep(0.1)
    finally:
        sm.clear_faults()

    assert statuses[-2:] == ["RollingBack", "InService"], statuses
    desc = client.describe_endpoint(EndpointName=endpoint)
    assert desc["EndpointConfigName"] == "ab-2"  # SageMaker keeps the old config; nothing else marks the rollback
    assert {v["VariantName"] for v in desc["ProductionVariants"]} == {"blue", "canary"}
    assert desc["LastDeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"] == [{"AlarmName": "standin-errors"}]
    assert "PendingDeploymentSummary" not in desc
    assert {v for v, _ in invoke_many(sm, 12)} <= {"blue", "canary"}


def test_an_endpoint_whose_server_cannot_start_fails(sm, tmp_path):
    client = sm.client("sagemaker")
    (tmp_path / "empty").mkdir()
    create_model(sm, "clf-empty", sm.upload_model(tmp_path / "empty", "models/empty/model.tar.gz"))
    client.create_endpoint_config(
        EndpointConfigName="empty-1", ProductionVariants=[variant("AllTraffic", "clf-empty", 1.0)]
    )
    client.create_endpoint(EndpointName="standin-empty", EndpointConfigName="empty-1")
    desc = sm.wait_endpoint("standin-empty", timeout=60)

    assert desc["EndpointStatus"] == "Failed"
    assert (
        "did not pass the ping health check" in desc["FailureReason"] and "no model to serve" in desc["FailureReason"]
    )
    client.delete_endpoint(EndpointName="standin-empty")
    assert "standin-empty" not in {e["EndpointName"] for e in client.list_endpoints()["Endpoints"]}


def test_application_auto_scaling_stores_variant_targets_and_policies(sm, endpoint):
    scaling = sm.client("application-autoscaling")
    resource = f"endpoint/{endpoint}/variant/blue"
    dimension = "sagemaker:variant:DesiredInstanceCount"
    scaling.register_scalable_target(
        ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=dimension, MinCapacity=1, MaxCapacity=4
    )
    scaling.put_scaling_policy(
        PolicyName="standin-invocations",
        ServiceNamespace="sagemaker",
        ResourceId=resource,
        ScalableDimension=dimension,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 100.0,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        },
    )
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
    assert [(t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [(1, 4)]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]
    assert [p["PolicyName"] for p in policies] == ["standin-invocations"]


def test_endpoint_logs_reach_cloudwatch_logs(sm, endpoint):
    streams = sm.client("logs").describe_log_streams(logGroupName=f"/aws/sagemaker/Endpoints/{endpoint}")["logStreams"]
    assert {s["logStreamName"].split("/")[0] for s in streams} >= {"blue", "canary"}


def test_update_endpoint_without_deployment_config_switches_and_stops_unused_servers(sm, endpoint):
    client = sm.client("sagemaker")
    canary_folder = sm.serving_root(endpoint, "canary")
    assert canary_folder is not None
    client.create_endpoint_config(EndpointConfigName="ab-4", ProductionVariants=[variant("blue", "clf-a", 1.0)])
    client.update_endpoint(EndpointName=endpoint, EndpointConfigName="ab-4")
    assert client.describe_endpoint(EndpointName=endpoint)["EndpointStatus"] == "Updating"
    desc = sm.wait_endpoint(endpoint, ["InService"], timeout=60)

    assert desc["EndpointConfigName"] == "ab-4" and weights_of(desc) == {"blue": (1.0, 1.0)}
    assert "ShadowProductionVariants" not in desc
    assert processes_under(canary_folder) == []
    assert invoke_many(sm, 3) == Counter({("blue", 200): 3})


def test_an_airflow_aws_connection_reaches_the_standin(sm, monkeypatch):
    require_module("airflow.providers.amazon")
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    monkeypatch.setenv("AIRFLOW_CONN_STANDIN_EXTRA", json.dumps({"conn_type": "aws", "extra": sm.connection_extra()}))
    monkeypatch.setenv("AIRFLOW_CONN_STANDIN_LOGIN", json.dumps(sm.connection()))
    for conn_id in ("standin_extra", "standin_login"):
        client = AwsBaseHook(aws_conn_id=conn_id, client_type="sagemaker").get_conn()
        assert ENDPOINT in {e["EndpointName"] for e in client.list_endpoints()["Endpoints"]}
        assert client.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"


# -- hyperparameter tuning --------------------------------------------------------------------------------------------

TUNING_METRICS = [  # what the adapter asks SageMaker to read from the training's result line
    {"Name": "eval_accuracy", "Regex": '"eval_accuracy": ([-+0-9.eE]+)'},
    {"Name": "eval_loss", "Regex": '"eval_loss": ([-+0-9.eE]+)'},
]
TRIAL_NAME = r"{tuning}-00\d-[0-9a-f]{{8}}"


def tuning_request(
    sm: SageMakerStandIn, name: str, dataset_uri: str, *, spec: str, max_jobs: int, parallel: int = 1
) -> dict[str, Any]:
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": "Random",
            "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "eval_accuracy"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": parallel},
            "ParameterRanges": {
                "ContinuousParameterRanges": [
                    {"Name": "learning_rate", "MinValue": "1e-5", "MaxValue": "1e-3", "ScalingType": "Logarithmic"}
                ],
                "IntegerParameterRanges": [
                    {"Name": "per_device_batch_size", "MinValue": "4", "MaxValue": "8", "ScalingType": "Linear"}
                ],
                "CategoricalParameterRanges": [],
            },
            "TrainingJobEarlyStoppingType": "Auto",
        },
        "TrainingJobDefinition": {
            "AlgorithmSpecification": {
                "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops:test",
                "TrainingInputMode": "File",
                "MetricDefinitions": TUNING_METRICS,
            },
            "RoleArn": sm.role_arn,
            "StaticHyperParameters": {"llmops_spec": spec},
            "InputDataConfig": [
                {
                    "ChannelName": "dataset",
                    "DataSource": {
                        "S3DataSource": {
                            "S3DataType": "S3Prefix",
                            "S3Uri": dataset_uri,
                            "S3DataDistributionType": "FullyReplicated",
                        }
                    },
                }
            ],
            "OutputDataConfig": {"S3OutputPath": sm.s3_uri("tuning")},
            "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
            "StoppingCondition": {"MaxRuntimeInSeconds": 900},
            "CheckpointConfig": {"S3Uri": sm.s3_uri(f"checkpoints/{name}")},
            "Environment": {"LLMOPS_STANDIN_TUNING": name},
        },
    }


def trials_of(sm: SageMakerStandIn, name: str) -> list[dict[str, Any]]:
    return sm.client("sagemaker").list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name, MaxResults=100
    )["TrainingJobSummaries"]


def test_a_tuning_job_request_is_checked_like_sagemaker(sm, dataset_uri):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    raw = boto3.session.Session().client(  # no client-side checks: the stand-in's own are under test
        "sagemaker",
        endpoint_url=sm.endpoint_url,
        region_name=sm.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(parameter_validation=False, retries={"max_attempts": 1}),
    )
    spec = spec_json(max_steps=4)

    def rejected(name: str, change: Any) -> str:
        request = tuning_request(sm, name, dataset_uri, spec=spec, max_jobs=2)
        change(request)
        with pytest.raises(ClientError) as err:
            raw.create_hyper_parameter_tuning_job(**request)
        assert err.value.response["Error"]["Code"] == "ValidationException", err.value.response
        return err.value.response["Error"]["Message"]

    config = "HyperParameterTuningJobConfig"
    continuous = lambda r: r[config]["ParameterRanges"]["ContinuousParameterRanges"][0]  # noqa: E731
    assert "less than or equal to 32" in rejected("t" * 33, lambda r: None)
    assert "greater than or equal to 1" in rejected(
        "standin-bad-limit", lambda r: r[config]["ResourceLimits"].update(MaxNumberOfTrainingJobs=0)
    )
    assert "Logarithmic" in rejected("standin-bad-log", lambda r: continuous(r).update(MinValue="0"))
    assert "greater than MaxValue" in rejected("standin-bad-minmax", lambda r: continuous(r).update(MinValue="0.1"))
    assert "must be numbers" in rejected("standin-bad-number", lambda r: continuous(r).update(MaxValue="lots"))
    assert "MetricDefinitions" in rejected(
        "standin-bad-objective", lambda r: r[config]["HyperParameterTuningJobObjective"].update(MetricName="f1")
    )
    assert "both static" in rejected(
        "standin-bad-static",
        lambda r: r["TrainingJobDefinition"]["StaticHyperParameters"].update(learning_rate="0.1"),
    )
    assert "Grid" in rejected("standin-bad-strategy", lambda r: r[config].update(Strategy="Grid"))
    assert sm.client("sagemaker").list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"] == []
    assert not any(
        j["TrainingJobName"].startswith("standin-bad") for j in raw.list_training_jobs()["TrainingJobSummaries"]
    )


def test_a_tuning_job_whose_trials_all_fail_fails(sm, dataset_uri):
    name = "standin-tune-bad"
    request = tuning_request(sm, name, dataset_uri, spec=json.dumps({"max_steps": "many"}), max_jobs=2, parallel=2)
    sm.client("sagemaker").create_hyper_parameter_tuning_job(**request)
    desc = sm.wait_tuning(name, timeout=120)

    assert desc["HyperParameterTuningJobStatus"] == "Failed"
    assert "No training job succeeded after 2 attempts" in desc["FailureReason"]
    assert desc["TrainingJobStatusCounters"]["NonRetryableError"] == 2
    assert desc["ObjectiveStatusCounters"] == {"Succeeded": 0, "Pending": 0, "Failed": 2}
    assert "BestTrainingJob" not in desc
    trials = trials_of(sm, name)
    assert len(trials) == 2
    for trial in trials:
        assert (trial["TrainingJobStatus"], trial["ObjectiveStatus"]) == ("Failed", "Failed")
        assert trial["FailureReason"].startswith("AlgorithmError: ")
        assert "FinalHyperParameterTuningJobObjectiveMetric" not in trial


def test_stop_hyper_parameter_tuning_job_stops_its_running_trial(sm, dataset_uri):
    from botocore.exceptions import ClientError

    client = sm.client("sagemaker")
    name = "standin-tune-stop"
    spec = spec_json(max_steps=100_000, checkpoint_every_steps=100_000)
    client.create_hyper_parameter_tuning_job(**tuning_request(sm, name, dataset_uri, spec=spec, max_jobs=3))
    deadline = time.monotonic() + 120
    while not (trials := trials_of(sm, name)) or "torch.distributed.run" not in logs_of(
        sm, trials[0]["TrainingJobName"]
    ):
        assert time.monotonic() < deadline, trials
        time.sleep(0.2)
    job = trials[0]["TrainingJobName"]

    client.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    assert (
        client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)["HyperParameterTuningJobStatus"]
        == "Stopping"
    )
    assert client.describe_training_job(TrainingJobName=job)["TrainingJobStatus"] == "Stopping"
    desc = sm.wait_tuning(name, timeout=120)

    assert desc["HyperParameterTuningJobStatus"] == "Stopped"
    assert desc["TrainingJobStatusCounters"]["Stopped"] == 1 and desc["TrainingJobStatusCounters"]["InProgress"] == 0
    assert desc["ObjectiveStatusCounters"] == {"Succeeded": 0, "Pending": 0, "Failed": 1}
    assert [t["TrainingJobName"] for t in trials_of(sm, name)] == [job]  # no trial launched after the stop
    trial = client.describe_training_job(TrainingJobName=job)
    assert (trial["TrainingJobStatus"], trial["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert "got SIGTERM" in logs_of(sm, job)
    assert processes_under(sm.training_root(job)) == []
    with pytest.raises(ClientError, match="ValidationException"):
        client.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)

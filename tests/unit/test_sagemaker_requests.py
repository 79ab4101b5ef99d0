"""The SageMaker requests our adapter sends, read as data: what a user's spec and plan become, and what is refused
before any API call."""

from __future__ import annotations

import json

import pytest

from airflow_llmops.platforms import PlatformCapabilities, get_platform
from airflow_llmops.platforms.sagemaker import SageMakerConfigError, SageMakerSettings
from airflow_llmops.platforms.sagemaker import requests as R
from airflow_llmops.specs import RolloutPlan, SpecValidationError, TrainingSpec

SETTINGS = SageMakerSettings(
    role_arn="arn:aws:iam::123456789012:role/llmops",
    image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops:1",
    s3_prefix="s3://bucket/llmops/",
    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
)


def _spec(**overrides: object) -> TrainingSpec:
    return TrainingSpec.parse({"dataset_uri": "s3://bucket/data/prepared", "epochs": 2, **overrides})


def test_training_request_maps_the_spec_onto_a_two_instance_spot_job() -> None:
    spec = _spec(
        distributed={"nnodes": 2, "rdzv_endpoint": "algo-1:29500", "use_spot": True, "instance_type": "ml.g5.xlarge"}
    )
    req = R.training_job_request(spec, job_name="llmops-train-abc", settings=SETTINGS)
    assert req["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert req["InputDataConfig"][0]["ChannelName"] == "dataset"
    assert req["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://bucket/data/prepared/"
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"]["MaxWaitTimeInSeconds"] >= req["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert req["CheckpointConfig"] == {
        "S3Uri": "s3://bucket/llmops/checkpoints/llmops-train-abc",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert req["OutputDataConfig"]["S3OutputPath"] == "s3://bucket/llmops/training"
    carried = TrainingSpec.from_json(req["HyperParameters"]["llmops_spec"])
    assert carried.epochs == 2 and carried.dataset_uri is None  # the container reads its channel instead
    assert req["Environment"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert {"Key": "llmops:job", "Value": "llmops-train-abc"} in req["Tags"]
    assert "EnableManagedSpotTraining" not in R.training_job_request(_spec(), job_name="j", settings=SETTINGS)


@pytest.mark.parametrize(
    ("settings", "spec", "message"),
    [
        (SageMakerSettings(image_uri="i", s3_prefix="s3://b"), _spec(), "role_arn"),
        (SageMakerSettings(role_arn=SETTINGS.role_arn, s3_prefix="s3://b"), _spec(), "image_uri"),
        (SageMakerSettings(role_arn="llmops", image_uri="i", s3_prefix="s3://b"), _spec(), "not an IAM role ARN"),
        (SageMakerSettings(role_arn=SETTINGS.role_arn, image_uri="i", s3_prefix="/tmp/x"), _spec(), "s3:// URI"),
        (SETTINGS, _spec(dataset_uri="/data/prepared"), "reads the dataset from S3"),
        (SETTINGS, _spec(distributed={"instance_type": "ml.m5.huge"}), "not a SageMaker training instance type"),
        (SETTINGS, _spec(lora={"target_modules": ["x" * 50] * 60}), "at most 2500"),
    ],
)
def test_bad_training_input_is_refused_before_any_api_call(
    settings: SageMakerSettings, spec: TrainingSpec, message: str
) -> None:
    with pytest.raises(SageMakerConfigError, match=message):
        R.training_job_request(spec, job_name="job", settings=settings)


def test_endpoint_config_is_named_by_its_content_and_captures_data() -> None:
    v1 = R.Variant("v1", "m1", 100.0, "ml.m5.large")
    v2 = R.Variant("v2", "m2", 0.0, "ml.m5.large")
    one = R.endpoint_config_request("chat", [v1, v2], settings=SETTINGS)
    assert (
        one["EndpointConfigName"]
        == R.endpoint_config_request("chat", [v1, v2], settings=SETTINGS)["EndpointConfigName"]
    )
    assert one["EndpointConfigName"] != R.endpoint_config_request("chat", [v1], settings=SETTINGS)["EndpointConfigName"]
    assert len(one["EndpointConfigName"]) <= 63
    assert [v["InitialVariantWeight"] for v in one["ProductionVariants"]] == [100.0, 0.0]
    assert one["DataCaptureConfig"]["DestinationS3Uri"] == "s3://bucket/llmops/datacapture"
    assert one["DataCaptureConfig"]["InitialSamplingPercentage"] == 100
    shadow = R.endpoint_config_request(
        "chat", [v1, R.Variant("v2", "m2", 50.0, "ml.m5.large", shadow=True)], settings=SETTINGS
    )
    assert [v["VariantName"] for v in shadow["ShadowProductionVariants"]] == ["v2"]
    off = SageMakerSettings(**{**SETTINGS.__dict__, "data_capture": False})
    assert "DataCaptureConfig" not in R.endpoint_config_request("chat", [v1], settings=off)


def test_model_request_per_model_source() -> None:
    packed = R.model_request("chat", "v1", "s3://b/job/output/model.tar.gz", settings=SETTINGS)
    assert packed["PrimaryContainer"]["ModelDataUrl"] == "s3://b/job/output/model.tar.gz"
    folder = R.model_request("chat", "v1", "s3://b/models/m1", settings=SETTINGS)
    assert folder["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["CompressionType"] == "None"
    registry = R.model_request("chat", "v3", "models:/chat/3", settings=SETTINGS)
    assert registry["PrimaryContainer"]["Environment"]["LLMOPS_MODEL_URI"] == "models:/chat/3"
    assert registry["ModelName"] != R.model_request("chat", "v3", "models:/chat/4", settings=SETTINGS)["ModelName"]
    with pytest.raises(SageMakerConfigError, match="cannot reach an endpoint"):
        R.model_request("chat", "v1", "/tmp/model", settings=SETTINGS)
    no_mlflow = SageMakerSettings(**{**SETTINGS.__dict__, "env": {}})
    with pytest.raises(SageMakerConfigError, match="MLFLOW_TRACKING_URI"):
        R.model_request("chat", "v1", "models:/chat/1", settings=no_mlflow)


def test_guarded_policy_per_strategy_and_refusals() -> None:
    canary = R.guarded_policy(
        RolloutPlan.parse({"strategy": "canary", "traffic_steps": [10, 100], "bake_seconds": 300})
    )
    assert canary["TrafficRoutingConfiguration"] == {
        "Type": "CANARY",
        "WaitIntervalInSeconds": 300,
        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
    }
    linear = R.guarded_policy(RolloutPlan.parse({"strategy": "linear", "linear_step_percent": 25, "bake_seconds": 60}))
    assert linear["TrafficRoutingConfiguration"]["LinearStepSize"] == {"Type": "CAPACITY_PERCENT", "Value": 25}
    assert R.guarded_policy(RolloutPlan.parse({"strategy": "blue_green"}))["TrafficRoutingConfiguration"]["Type"] == (
        "ALL_AT_ONCE"
    )
    with pytest.raises(SageMakerConfigError, match="one canary step"):
        R.guarded_policy(RolloutPlan.parse({"strategy": "canary", "traffic_steps": [10, 50, 100]}))
    with pytest.raises(SageMakerConfigError, match="shadow"):
        R.guarded_policy(RolloutPlan.parse({"strategy": "shadow"}))
    with pytest.raises(SpecValidationError, match="auto_rollback"):
        RolloutPlan.parse({"strategy": "blue_green", "native_guardrails": True, "auto_rollback": False})


def test_slo_alarms_stand_for_the_plan() -> None:
    plan = RolloutPlan.parse(
        {"strategy": "blue_green", "slo": {"p95_latency_ms": 250, "max_error_rate": 0.02}, "native_guardrails": True}
    )
    alarms = {a["AlarmName"]: a for a in R.slo_alarms("chat", "v2", plan)}
    assert set(alarms) == set(R.alarm_names("chat", "v2").values())
    errors, latency = alarms["llmops-chat-v2-errors"], alarms["llmops-chat-v2-latency"]
    assert errors["Threshold"] == 0.02 and any("Expression" in m for m in errors["Metrics"])
    assert latency["Threshold"] == 250_000.0 and latency["ExtendedStatistic"] == "p95"
    dims = latency["Dimensions"]
    assert {"Name": "VariantName", "Value": "v2"} in dims and {"Name": "EndpointName", "Value": "chat"} in dims


def test_capabilities_refuse_what_a_platform_cannot_do() -> None:
    local = PlatformCapabilities(traffic_split=True, shadow=True)
    native = RolloutPlan.parse({"strategy": "blue_green", "native_guardrails": True})
    assert "native_guardrails" in (local.refuse(native, "local") or "")
    scaled = RolloutPlan.parse({"strategy": "blue_green", "autoscaling": {"min_instances": 1, "max_instances": 4}})
    assert "autoscale" in (local.refuse(scaled, "local") or "")
    sagemaker = get_platform("sagemaker", **{k: v for k, v in SETTINGS.__dict__.items() if k in ("role_arn",)})
    assert sagemaker.capabilities.refuse(native, "sagemaker") is None
    assert sagemaker.capabilities.refuse(scaled, "sagemaker") is None
    with pytest.raises(SpecValidationError, match="max_instances"):
        RolloutPlan.parse({"autoscaling": {"min_instances": 3, "max_instances": 2}, "strategy": "blue_green"})


def test_unknown_platform_options_are_named() -> None:
    with pytest.raises(SageMakerConfigError, match="unknown sagemaker platform options \\['rol_arn'\\]"):
        get_platform("sagemaker", rol_arn="x")


def test_weights_as_percent() -> None:
    assert R.percent({"a": 1.0, "b": 3.0}) == {"a": 25.0, "b": 75.0}
    assert R.percent({"a": 0.0}) == {"a": 0.0}
    assert json.dumps(R.percent({"v1": 90, "v2": 10})) == '{"v1": 90.0, "v2": 10.0}'


def _tuning(**overrides: object):  # type: ignore[no-untyped-def]
    from airflow_llmops.specs.tuning import TuningSpec

    return TuningSpec.parse(
        {
            "training": {"dataset_uri": "s3://bucket/data/prepared", "max_steps": 20},
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                "per_device_batch_size": {"type": "int", "low": 8, "high": 32},
                "lora.r": {"type": "categorical", "choices": [4, 8]},
            },
            "n_trials": 6,
            "timeout_s": 3600,
            **overrides,
        }
    )


def test_a_tuning_spec_becomes_a_sagemaker_tuning_job() -> None:
    req = R.tuning_job_request(_tuning(), job_name="llmops-tune-abc", settings=SETTINGS)
    config = req["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "eval_accuracy"}
    assert config["ResourceLimits"] == {
        "MaxNumberOfTrainingJobs": 6,
        "MaxParallelTrainingJobs": 1,
        "MaxRuntimeInSeconds": 3600,
    }
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-05", "MaxValue": "0.001", "ScalingType": "Logarithmic"}
    ]
    assert ranges["IntegerParameterRanges"][0] == {
        "Name": "per_device_batch_size",
        "MinValue": "8",
        "MaxValue": "32",
        "ScalingType": "Linear",
    }
    assert ranges["CategoricalParameterRanges"] == [{"Name": "lora.r", "Values": ["4", "8"]}]
    definition = req["TrainingJobDefinition"]
    assert TrainingSpec.from_json(definition["StaticHyperParameters"]["llmops_spec"]).max_steps == 20
    [metric] = definition["AlgorithmSpecification"]["MetricDefinitions"]
    import re

    line = '[llmops-result] {"metrics": {"eval_accuracy": 0.8125, "eval_loss": 0.61}, "mlflow_run_id": "x"}'
    assert re.search(metric["Regex"], line).group(1) == "0.8125"  # the training's result line in the job's log
    minimise = R.tuning_job_request(
        _tuning(metric="eval_loss", sampler="random", pruner="none"), job_name="t", settings=SETTINGS
    )
    assert minimise["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["Type"] == "Minimize"
    assert minimise["HyperParameterTuningJobConfig"]["Strategy"] == "Random"


def test_tuning_requests_sagemaker_cannot_run_are_refused() -> None:
    with pytest.raises(SageMakerConfigError, match="32 characters"):
        R.tuning_job_request(_tuning(), job_name="x" * 33, settings=SETTINGS)
    with pytest.raises(SageMakerConfigError, match="initial_trials"):
        R.tuning_job_request(_tuning(initial_trials=[{"learning_rate": 1e-4}]), job_name="t", settings=SETTINGS)
    grid = {"learning_rate": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1}}
    with pytest.raises(SageMakerConfigError, match="no step"):
        R.tuning_job_request(_tuning(search_space=grid), job_name="t", settings=SETTINGS)


def test_the_runtime_applies_a_trials_values_to_the_spec() -> None:
    from airflow_llmops.ml.runtime import ContractError, apply_tuned

    spec = _spec(max_steps=10)
    tuned = apply_tuned(spec, {"learning_rate": "0.0003", "per_device_batch_size": "16", "lora.r": "8"})
    assert tuned.learning_rate == 0.0003 and tuned.per_device_batch_size == 16
    assert tuned.lora is not None and tuned.lora.r == 8 and tuned.max_steps == 10
    with pytest.raises(ContractError, match="not a TrainingSpec field"):
        apply_tuned(spec, {"learning_rat": "0.1"})
    with pytest.raises(ContractError, match="invalid TrainingSpec"):
        apply_tuned(spec, {"learning_rate": "7"})

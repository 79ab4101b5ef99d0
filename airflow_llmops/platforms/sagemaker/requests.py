"""SageMaker API requests built from our specs: pure functions of their inputs, checked before any API call.

Nothing here talks to AWS, so every request the adapter sends can be read (and tested) as data.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_llmops.platforms.base import registry_model_env
from airflow_llmops.specs import RolloutPlan, TrainingSpec

#: The training channel holding the prepared dataset (``/opt/ml/input/data/dataset`` in the container).
DATASET_CHANNEL = "dataset"
#: Hyperparameter carrying the whole :class:`TrainingSpec` as JSON (SageMaker caps a value at 2500 characters).
SPEC_HYPERPARAMETER = "llmops_spec"
MAX_HYPERPARAMETER = 2500
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
NAMESPACE = "AWS/SageMaker"
ABORT_NAMESPACE = "airflow-llmops"
TAG_ENDPOINT = "llmops:endpoint"
TAG_VARIANT = "llmops:variant"
TAG_JOB = "llmops:job"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/\S+$")
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class SageMakerConfigError(ValueError):
    """A setting the SageMaker platform needs is missing or wrong; the message says where to set it."""


def _instance_types(shape: str) -> tuple[str, ...]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return tuple(model.shape_for(shape).enum)


@dataclass(frozen=True)
class SageMakerSettings:
    """What the adapter needs beyond the connection, as JSON values (what a trigger carries between processes).

    :param aws_conn_id: the Airflow ``aws`` connection (credentials, region, ``endpoint_url`` in its extra).
    :param role_arn: the execution role SageMaker assumes for jobs and endpoints (S3, ECR, CloudWatch access).
    :param image_uri: the runtime image built from ``docker/runtime.Dockerfile`` and pushed to ECR.
    :param s3_prefix: ``s3://bucket/prefix`` for job outputs, checkpoints, Data Capture and rollout records.
    :param env: environment of training containers and served models (e.g. ``MLFLOW_TRACKING_URI``).
    """

    aws_conn_id: str | None = "aws_default"
    region_name: str | None = None
    role_arn: str = ""
    image_uri: str = ""
    s3_prefix: str = ""
    instance_type: str = "ml.m5.xlarge"
    volume_size_gb: int = 30
    max_runtime_s: int = 24 * 3600
    max_wait_s: int | None = None
    serving_instance_type: str = "ml.m5.large"
    serving_instance_count: int = 1
    data_capture: bool = True
    capture_percent: int = 100
    env: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    wait_timeout_s: float = 3600.0
    poll_s: float = 15.0
    max_attempts: int = 5
    max_parallel_trials: int = 1

    def require(self, *names: str) -> None:
        """Refuse, before any API call, settings the operation needs and does not have (or has wrong)."""
        hints = {
            "role_arn": "the IAM role SageMaker assumes, e.g. arn:aws:iam::123456789012:role/llmops-sagemaker",
            "image_uri": "the runtime image in ECR, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops:1.0",
            "s3_prefix": "where jobs and endpoints keep their files, e.g. s3://my-bucket/llmops",
        }
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise SageMakerConfigError(
                "the sagemaker platform needs "
                + "; ".join(f"{n} ({hints.get(n, n)})" for n in missing)
                + ": set it in the operator's platform_options or in [llmops] sagemaker_<name>"
            )
        if "role_arn" in names and not _ROLE_ARN.match(self.role_arn):
            raise SageMakerConfigError(
                f"role_arn {self.role_arn!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)"
            )
        if "s3_prefix" in names and not self.s3_prefix.startswith("s3://"):
            raise SageMakerConfigError(f"s3_prefix {self.s3_prefix!r} must be an s3:// URI")

    def s3(self, *parts: str) -> str:
        return "/".join([self.s3_prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def check_instance_type(value: str, *, serving: bool) -> str:
    shape = "ProductionVariantInstanceType" if serving else "TrainingInstanceType"
    known = _instance_types(shape)
    if value not in known:
        close = [k for k in known if k.split(".")[1:2] == value.split(".")[1:2]][:6] or list(known[:6])
        what = "endpoint" if serving else "training"
        raise SageMakerConfigError(
            f"instance type {value!r} is not a SageMaker {what} instance type; e.g. {', '.join(close)}"
        )
    return value


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise SageMakerConfigError(f"{what} {value!r} is not a SageMaker name (1-63 letters, digits, inner hyphens)")
    return value


def short_name(*parts: str, salt: str = "", limit: int = 63) -> str:
    """``part1-part2-<hash>`` within SageMaker's 63 characters; the hash keeps truncated names distinct."""
    digest = hashlib.sha256("\x00".join([*parts, salt]).encode()).hexdigest()[:8]
    base = "-".join(p.strip("-") for p in parts if p)
    keep = limit - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}"


def tags(settings: SageMakerSettings, **ours: str) -> list[dict[str, str]]:
    merged = {**settings.tags, **{f"llmops:{k}": v for k, v in ours.items()}}
    return [{"Key": k, "Value": v} for k, v in merged.items()]


def training_job_request(spec: TrainingSpec, *, job_name: str, settings: SageMakerSettings) -> dict[str, Any]:
    """``CreateTrainingJob`` for ``spec``: one instance per node, the dataset as a channel, the spec as a
    hyperparameter, managed spot with S3 checkpoints when ``spec.distributed.use_spot``."""
    settings.require("role_arn", "image_uri", "s3_prefix")
    dataset = str(spec.dataset_uri or "")
    if not dataset.startswith("s3://"):
        raise SageMakerConfigError(
            f"the sagemaker platform reads the dataset from S3, got {dataset!r}: give the prepare task an s3:// "
            "artifact_root (or [llmops] artifact_root) so the prepared dataset lands there"
        )
    instance_type = check_instance_type(spec.distributed.instance_type or settings.instance_type, serving=False)
    payload = spec.model_copy(update={"dataset_uri": None, "output_uri": None}).to_json()
    if len(payload) > MAX_HYPERPARAMETER:
        raise SageMakerConfigError(
            f"the training spec is {len(payload)} characters as JSON; SageMaker takes at most {MAX_HYPERPARAMETER} in "
            "a hyperparameter (shorten lists such as lora.target_modules)"
        )
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": settings.max_runtime_s}
    request: dict[str, Any] = {
        "TrainingJobName": check_name(job_name, "job name"),
        "AlgorithmSpecification": {"TrainingImage": settings.image_uri, "TrainingInputMode": "File"},
        "RoleArn": settings.role_arn,
        "HyperParameters": {SPEC_HYPERPARAMETER: payload},
        "InputDataConfig": [
            {
                "ChannelName": DATASET_CHANNEL,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": dataset.rstrip("/") + "/",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        "OutputDataConfig": {"S3OutputPath": settings.s3("training")},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": spec.distributed.nnodes,
            "VolumeSizeInGB": settings.volume_size_gb,
        },
        "StoppingCondition": stopping,
        # A spot restart (and a retry of a job that failed) resumes from here: SageMaker restores it on every host.
        "CheckpointConfig": {"S3Uri": settings.s3("checkpoints", job_name), "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Environment": {k: str(v) for k, v in settings.env.items()},
        "Tags": tags(settings, job=job_name),
    }
    if spec.distributed.use_spot:
        request["EnableManagedSpotTraining"] = True
        stopping["MaxWaitTimeInSeconds"] = max(
            settings.max_wait_s or 2 * settings.max_runtime_s, settings.max_runtime_s
        )
    return request


@dataclass(frozen=True)
class Variant:
    """One version behind an endpoint: its model, fleet and weight (relative, as SageMaker keeps it)."""

    name: str
    model: str
    weight: float
    instance_type: str
    instance_count: int = 1
    shadow: bool = False

    def as_request(self) -> dict[str, Any]:
        return {
            "VariantName": self.name,
            "ModelName": self.model,
            "InitialInstanceCount": self.instance_count,
            "InstanceType": self.instance_type,
            "InitialVariantWeight": float(self.weight),
        }


def endpoint_config_request(endpoint: str, variants: list[Variant], *, settings: SageMakerSettings) -> dict[str, Any]:
    """An endpoint config named after its content (the same variants give the same name: creating it twice is
    harmless), with Data Capture to ``<s3_prefix>/datacapture`` unless the settings turn it off."""
    production = [v for v in variants if not v.shadow]
    shadows = [v for v in variants if v.shadow]
    body: dict[str, Any] = {"ProductionVariants": [v.as_request() for v in production]}
    if shadows:
        body["ShadowProductionVariants"] = [v.as_request() for v in shadows]
    if settings.data_capture:
        body["DataCaptureConfig"] = {
            "EnableCapture": True,
            "InitialSamplingPercentage": settings.capture_percent,
            "DestinationS3Uri": settings.s3("datacapture"),
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        }
    name = short_name(endpoint, "c", salt=json.dumps(body, sort_keys=True))
    return {"EndpointConfigName": name, **body, "Tags": tags(settings, endpoint=endpoint)}


def model_request(endpoint: str, variant: str, model_uri: str, *, settings: SageMakerSettings) -> dict[str, Any]:
    """``CreateModel`` for one version: a ``model.tar.gz`` (a training job's output) is unpacked by SageMaker into
    ``/opt/ml/model``; an S3 folder is copied there as is; a registry URI (``models:/name/3``) is loaded by the
    server from MLflow at start (``LLMOPS_MODEL_URI``, with the settings' ``MLFLOW_TRACKING_URI``)."""
    settings.require("role_arn", "image_uri")
    env = {k: str(v) for k, v in settings.env.items()}
    container: dict[str, Any] = {"Image": settings.image_uri, "Environment": env}
    if model_uri.startswith("s3://") and model_uri.endswith(".tar.gz"):
        container["ModelDataUrl"] = model_uri
    elif model_uri.startswith("s3://"):
        container["ModelDataSource"] = {
            "S3DataSource": {"S3Uri": model_uri.rstrip("/") + "/", "S3DataType": "S3Prefix", "CompressionType": "None"}
        }
    elif model_uri.startswith("models:/"):
        registry_model_env(model_uri, env, SageMakerConfigError)
    else:
        raise SageMakerConfigError(
            f"model_uri {model_uri!r}: SageMaker serves models from S3 (s3://.../model.tar.gz or a folder) or from the "
            "MLflow registry (models:/name/version); a local folder cannot reach an endpoint"
        )
    env["LLMOPS_MODEL_SOURCE"] = model_uri
    return {
        "ModelName": short_name(endpoint, variant, salt=model_uri),
        "PrimaryContainer": container,
        "ExecutionRoleArn": settings.role_arn,
        "Tags": tags(settings, endpoint=endpoint, variant=variant),
    }


def percent(weights: Mapping[str, float]) -> dict[str, float]:
    """SageMaker's relative weights as percentages of the endpoint's traffic."""
    total = sum(weights.values())
    if total <= 0:
        return {k: 0.0 for k in weights}
    return {k: round(100.0 * v / total, 6) for k, v in weights.items()}


def guarded_policy(plan: RolloutPlan) -> dict[str, Any]:
    """SageMaker's blue/green ``TrafficRoutingConfiguration`` for ``plan``; refuses what SageMaker cannot walk."""
    bake = round(plan.bake_seconds)
    if bake > 3600:
        raise SageMakerConfigError(f"bake_seconds {plan.bake_seconds:g}: SageMaker waits at most 3600 s per step")
    steps = plan.steps()
    if plan.strategy == "shadow":
        raise SageMakerConfigError("native_guardrails cannot run a shadow rollout; SageMaker shadows are not guarded")
    if plan.strategy == "canary":
        if len(steps) != 2:
            raise SageMakerConfigError(
                f"SageMaker's canary has one canary step, then all traffic: use traffic_steps [<percent>, 100], got "
                f"{steps} (or strategy 'linear', or native_guardrails=False for any steps)"
            )
        routing = {
            "Type": "CANARY",
            "WaitIntervalInSeconds": bake,
            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": int(steps[0])},
        }
    elif plan.strategy == "linear":
        sizes = {round(b - a, 6) for a, b in zip([0.0, *steps], steps, strict=False)}
        if len(sizes) != 1:
            raise SageMakerConfigError(f"SageMaker's linear shift moves equal steps; {steps} are not")
        routing = {
            "Type": "LINEAR",
            "WaitIntervalInSeconds": bake,
            "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": int(sizes.pop())},
        }
    else:
        routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": bake}
    return {
        "TrafficRoutingConfiguration": routing,
        "TerminationWaitInSeconds": min(bake, 3600),
        "MaximumExecutionTimeoutInSeconds": min(28800, max(600, bake * (len(steps) + 1) + 1800)),
    }


def alarm_names(endpoint: str, variant: str) -> dict[str, str]:
    base = f"llmops-{endpoint}-{variant}"
    return {kind: f"{base}-{kind}" for kind in ("errors", "latency", "abort")}


def slo_alarms(endpoint: str, variant: str, plan: RolloutPlan) -> list[dict[str, Any]]:
    """``PutMetricAlarm`` requests that stand for the plan's SLO on the new variant (SageMaker rolls back when one
    fires): the 5XX error rate (metric math), p95 ``ModelLatency``, and an abort alarm the rollout raises itself
    to make SageMaker roll back (a killed task, a timeout)."""
    names = alarm_names(endpoint, variant)
    dims = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]

    def stat(metric: str, query_id: str) -> dict[str, Any]:
        return {
            "Id": query_id,
            "MetricStat": {
                "Metric": {"Namespace": NAMESPACE, "MetricName": metric, "Dimensions": dims},
                "Period": 60,
                "Stat": "Sum",
            },
            "ReturnData": False,
        }

    common = {"EvaluationPeriods": 1, "DatapointsToAlarm": 1, "TreatMissingData": "notBreaching"}
    description = f"airflow-llmops rollout of {variant} on {endpoint}"
    return [
        {
            "AlarmName": names["errors"],
            "AlarmDescription": f"{description}: 5XX error rate above {plan.slo.max_error_rate:g}",
            "Metrics": [
                stat("Invocation5XXErrors", "errors"),
                stat("Invocations", "calls"),
                {"Id": "rate", "Expression": "IF(calls > 0, errors / calls, 0)", "ReturnData": True},
            ],
            "Threshold": plan.slo.max_error_rate,
            "ComparisonOperator": "GreaterThanThreshold",
            **common,
        },
        {
            "AlarmName": names["latency"],
            "AlarmDescription": f"{description}: p95 model latency above {plan.slo.p95_latency_ms:g} ms",
            "Namespace": NAMESPACE,
            "MetricName": "ModelLatency",
            "Dimensions": dims,
            "ExtendedStatistic": "p95",
            "Period": 60,
            "Threshold": plan.slo.p95_latency_ms * 1000.0,  # ModelLatency is in microseconds
            "ComparisonOperator": "GreaterThanThreshold",
            **common,
        },
        {
            "AlarmName": names["abort"],
            "AlarmDescription": f"{description}: raised by the rollout to make SageMaker roll back",
            "Namespace": ABORT_NAMESPACE,
            "MetricName": "RolloutAbort",
            "Dimensions": dims,
            "Statistic": "Maximum",
            "Period": 60,
            "Threshold": 0.0,
            "ComparisonOperator": "GreaterThanThreshold",
            **common,
        },
    ]


def metric_regex(name: str) -> str:
    """How SageMaker finds ``name`` in a training job's log: the training's result line (``[llmops-result] {...}``,
    JSON with the final metrics) holds ``"<name>": <value>``."""
    return f'"{re.escape(name)}": ([-+0-9.eE]+)'


def tuning_job_request(tuning: Any, *, job_name: str, settings: SageMakerSettings) -> dict[str, Any]:
    """``CreateHyperParameterTuningJob`` for a :class:`~airflow_llmops.specs.tuning.TuningSpec`: its search space
    as parameter ranges (applied by the runtime to the spec, dotted names for nested fields), its metric as the
    objective read from each trial's log, ``n_trials`` / ``timeout_s`` as resource limits, the TPE sampler as
    SageMaker's Bayesian strategy and the median pruner as its automatic early stopping."""
    if len(job_name) > 32:
        raise SageMakerConfigError(f"tuning job name {job_name!r} is longer than SageMaker's 32 characters")
    check_name(job_name, "tuning job name")
    if tuning.initial_trials:
        raise SageMakerConfigError(
            "initial_trials cannot be given to a SageMaker tuning job (it warm-starts only from earlier tuning jobs); "
            "remove them or tune on the local platform"
        )
    training = training_job_request(tuning.training, job_name=job_name, settings=settings)
    continuous: list[dict[str, Any]] = []
    integer: list[dict[str, Any]] = []
    categorical: list[dict[str, Any]] = []
    for name, rng in sorted(tuning.search_space.items()):
        if rng.type == "categorical":
            categorical.append(
                {"Name": name, "Values": [json.dumps(v) if not isinstance(v, str) else v for v in rng.choices]}
            )
            continue
        if rng.step is not None:
            raise SageMakerConfigError(
                f"search_space.{name}: SageMaker ranges have no step; use a categorical range of the grid values"
            )
        entry = {
            "Name": name,
            "MinValue": str(int(rng.low) if rng.type == "int" else rng.low),
            "MaxValue": str(int(rng.high) if rng.type == "int" else rng.high),
            "ScalingType": "Logarithmic" if rng.log else "Linear",
        }
        (integer if rng.type == "int" else continuous).append(entry)
    limits: dict[str, Any] = {
        "MaxNumberOfTrainingJobs": tuning.n_trials,
        "MaxParallelTrainingJobs": min(settings.max_parallel_trials, tuning.n_trials),
    }
    if tuning.timeout_s:
        limits["MaxRuntimeInSeconds"] = int(tuning.timeout_s)
    algorithm = dict(training["AlgorithmSpecification"])
    algorithm["MetricDefinitions"] = [{"Name": tuning.metric, "Regex": metric_regex(tuning.metric)}]
    definition = {
        key: training[key]
        for key in (
            "RoleArn",
            "InputDataConfig",
            "OutputDataConfig",
            "ResourceConfig",
            "StoppingCondition",
            "Environment",
            "EnableManagedSpotTraining",
        )
        if key in training
    }
    return {
        "HyperParameterTuningJobName": job_name,
        "HyperParameterTuningJobConfig": {
            "Strategy": "Bayesian" if tuning.sampler == "tpe" else "Random",
            "HyperParameterTuningJobObjective": {
                "Type": "Maximize" if tuning.resolved_direction == "maximize" else "Minimize",
                "MetricName": tuning.metric,
            },
            "ResourceLimits": limits,
            "ParameterRanges": {
                "ContinuousParameterRanges": continuous,
                "IntegerParameterRanges": integer,
                "CategoricalParameterRanges": categorical,
            },
            "TrainingJobEarlyStoppingType": "Auto" if tuning.pruner == "median" else "Off",
        },
        "TrainingJobDefinition": {
            **definition,
            "AlgorithmSpecification": algorithm,
            "StaticHyperParameters": training["HyperParameters"],
        },
        "Tags": tags(settings, job=job_name),
    }

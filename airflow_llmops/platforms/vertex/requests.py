"""Vertex AI requests built from our specs as plain dicts (the v1 API's field names): checked before any API call,
readable and testable as data. The adapter turns them into the client library's messages."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_llmops.platforms.base import registry_model_env
from airflow_llmops.specs import RolloutPlan, TrainingSpec

LABEL_ENDPOINT = "llmops-endpoint"
LABEL_VARIANT = "llmops-variant"
LABEL_JOB = "llmops-job"
LABEL_SOURCE = "llmops-source"
CPU_METRIC = "aiplatform.googleapis.com/prediction/online/cpu/utilization"
_LABEL_VALUE = re.compile(r"[^a-z0-9_-]+")
# Machine families and the accelerators they take (Vertex's custom training compute), for checks before a call.
_ACCELERATORS = {
    "n1-": {"NVIDIA_TESLA_T4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P4", "NVIDIA_TESLA_P100"},
    "a2-": {"NVIDIA_TESLA_A100", "NVIDIA_A100_80GB"},
    "a3-": {"NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB", "NVIDIA_H200_141GB"},
    "g2-": {"NVIDIA_L4"},
}
_MACHINE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9-]+$")


class VertexConfigError(ValueError):
    """A setting the Vertex AI platform needs is missing or wrong; the message says where to set it."""


@dataclass(frozen=True)
class VertexSettings:
    """What the adapter needs beyond the connection (JSON values only: credentials stay in the connection).

    :param gcp_conn_id: the Airflow ``google_cloud_platform`` connection (credentials, project; its extra may name
        ``api_endpoint``, ``transport`` and ``monitoring_endpoint`` for a private or test endpoint).
    :param staging_uri: ``gs://bucket/prefix`` for job outputs, checkpoints and rollout records.
    :param image_uri: the runtime image built from ``docker/runtime.Dockerfile`` (Artifact Registry).
    :param max_parallel_trials: trials of a hyperparameter tuning job that run at once.
    :param request_response_logging_uri: ``bq://project[.dataset[.table]]``: new endpoints log their requests and
        responses to that BigQuery table (Vertex's request-response logging); export it to Cloud Storage as JSON
        for :class:`~airflow_llmops.operators.drift.DriftCheckOperator` (``capture_format="vertex"``).
    """

    gcp_conn_id: str | None = "google_cloud_default"
    project: str | None = None
    region: str = "us-central1"
    staging_uri: str = ""
    image_uri: str = ""
    service_account: str | None = None
    machine_type: str = "n1-standard-8"
    accelerator_type: str | None = None
    accelerator_count: int = 0
    serving_machine_type: str = "n1-standard-4"
    serving_min_replicas: int = 1
    serving_max_replicas: int = 1
    max_parallel_trials: int = 2
    request_response_logging_uri: str | None = None
    request_response_sampling_rate: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    wait_timeout_s: float = 3600.0
    poll_s: float = 15.0
    api_endpoint: str | None = None
    transport: str | None = None
    monitoring_endpoint: str | None = None

    def require(self, *names: str) -> None:
        hints = {
            "staging_uri": "where jobs and endpoints keep their files, e.g. gs://my-bucket/llmops",
            "image_uri": "the runtime image, e.g. us-docker.pkg.dev/my-project/llmops/runtime:1.0",
        }
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise VertexConfigError(
                "the vertex platform needs "
                + "; ".join(f"{n} ({hints.get(n, n)})" for n in missing)
                + ": set it in the operator's platform_options or in [llmops] vertex_<name>"
            )
        if "staging_uri" in names and not self.staging_uri.startswith(("gs://", "file://", "/")):
            raise VertexConfigError(f"staging_uri {self.staging_uri!r} must be a gs:// URI")

    def path(self, *parts: str) -> str:
        return "/".join([self.staging_uri.rstrip("/"), *(p.strip("/") for p in parts)])


def label_value(value: str) -> str:
    """A label value Vertex accepts (lowercase letters, digits, ``-``/``_``, at most 63), distinct when shortened."""
    clean = _LABEL_VALUE.sub("-", value.lower())
    if len(clean) <= 63:
        return clean
    return f"{clean[:54]}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def labels(settings: VertexSettings, **ours: str) -> dict[str, str]:
    return {**settings.labels, **{f"llmops-{k}": label_value(v) for k, v in ours.items()}}


def machine_spec(machine_type: str, accelerator_type: str | None, accelerator_count: int) -> dict[str, Any]:
    if not _MACHINE.match(machine_type):
        raise VertexConfigError(
            f"machine type {machine_type!r} is not a Compute Engine machine type (e.g. n1-standard-8)"
        )
    spec: dict[str, Any] = {"machine_type": machine_type}
    if accelerator_type:
        family = next((f for f in _ACCELERATORS if machine_type.startswith(f)), None)
        if family is None or accelerator_type not in _ACCELERATORS[family]:
            fits = sorted(_ACCELERATORS[family]) if family else "none (use an n1-, a2-, a3- or g2- machine)"
            raise VertexConfigError(
                f"machine type {machine_type} cannot take accelerator {accelerator_type}; it takes: {fits}"
            )
        if accelerator_count < 1:
            raise VertexConfigError(f"accelerator {accelerator_type} needs accelerator_count >= 1")
        spec.update(accelerator_type=accelerator_type, accelerator_count=accelerator_count)
    return spec


def custom_job(spec: TrainingSpec, *, job_name: str, settings: VertexSettings) -> dict[str, Any]:
    """A ``CustomJob``: workerpool0 is the chief, workerpool1 the other ``nnodes - 1`` replicas; the runtime image's
    ``train`` reads the spec and dataset from its environment and Vertex's cluster spec for torchrun."""
    settings.require("staging_uri", "image_uri")
    dataset = str(spec.dataset_uri or "")
    if not dataset.startswith(("gs://", "file://", "/")):
        raise VertexConfigError(
            f"the vertex platform reads the dataset from Cloud Storage, got {dataset!r}: give the prepare task a gs:// "
            "artifact_root so the prepared dataset lands there"
        )
    machine = machine_spec(
        spec.distributed.instance_type or settings.machine_type, settings.accelerator_type, settings.accelerator_count
    )
    output = settings.path("training", job_name)
    payload = spec.model_copy(update={"dataset_uri": None, "output_uri": None}).to_json()
    env = {
        **{k: str(v) for k, v in settings.env.items()},
        "LLMOPS_SPEC": payload,
        "LLMOPS_DATASET_URI": dataset,
        "LLMOPS_RESULT_URI": f"{output}/llmops/result.json",
    }
    container = {
        "image_uri": settings.image_uri,
        "args": ["train"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
    }
    pools = [{"machine_spec": machine, "replica_count": 1, "container_spec": container}]
    if spec.distributed.nnodes > 1:
        pools.append(
            {"machine_spec": machine, "replica_count": spec.distributed.nnodes - 1, "container_spec": container}
        )
    job_spec: dict[str, Any] = {
        "worker_pool_specs": pools,
        "base_output_directory": {"output_uri_prefix": output},
        "scheduling": {
            "strategy": "SPOT" if spec.distributed.use_spot else "STANDARD",
            # A preempted Spot replica restarts and resumes from the checkpoints in base_output_directory.
            "restart_job_on_worker_restart": bool(spec.distributed.use_spot),
        },
    }
    if settings.service_account:
        job_spec["service_account"] = settings.service_account
    return {"display_name": job_name, "labels": labels(settings, job=job_name), "job_spec": job_spec}


def model_upload(endpoint: str, variant: str, model_uri: str, *, settings: VertexSettings) -> dict[str, Any]:
    """A ``Model`` serving ``model_uri`` with the runtime image: a Cloud Storage folder is copied by Vertex for the
    server (``AIP_STORAGE_URI``); a registry URI (``models:/name/3``) is loaded by the server from MLflow."""
    settings.require("image_uri")
    env = {k: str(v) for k, v in settings.env.items()}
    body: dict[str, Any] = {}
    if model_uri.startswith(("gs://", "file://")):
        body["artifact_uri"] = model_uri.rstrip("/")
    elif model_uri.startswith("models:/"):
        registry_model_env(model_uri, env, VertexConfigError)
    else:
        raise VertexConfigError(
            f"model_uri {model_uri!r}: Vertex serves models from Cloud Storage (gs://...) or from the MLflow registry "
            "(models:/name/version); a local folder cannot reach an endpoint"
        )
    if settings.staging_uri:  # the server ships its request log there on rotation: drift reads it from any cloud
        env["LLMOPS_REQUEST_LOG_SHIP_URI"] = settings.path("endpoints", endpoint, "requests")
    return {
        "display_name": f"{endpoint}-{variant}"[:128],
        "labels": labels(
            settings, endpoint=endpoint, variant=variant, source=hashlib.sha256(model_uri.encode()).hexdigest()[:16]
        ),
        "container_spec": {
            "image_uri": settings.image_uri,
            "args": ["serve"],
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "ports": [{"container_port": 8080}],
        },
        **body,
    }


def dedicated_resources(plan: RolloutPlan, settings: VertexSettings) -> dict[str, Any]:
    """The deployed model's fleet; ``plan.autoscaling`` sets its replica range and CPU target."""
    spec: dict[str, Any] = {
        "machine_spec": machine_spec(settings.serving_machine_type, None, 0),
        "min_replica_count": settings.serving_min_replicas,
        "max_replica_count": max(settings.serving_min_replicas, settings.serving_max_replicas),
    }
    scaling = plan.autoscaling
    if scaling is not None:
        spec["min_replica_count"] = scaling.min_instances
        spec["max_replica_count"] = scaling.max_instances
        if scaling.target_cpu_percent is not None:
            spec["autoscaling_metric_specs"] = [{"metric_name": CPU_METRIC, "target": scaling.target_cpu_percent}]
    return spec


def integer_split(weights: Mapping[str, float]) -> dict[str, int]:
    """Percentages as the whole numbers Vertex takes (largest remainder: still summing to 100)."""
    floors = {k: int(v) for k, v in weights.items()}
    left = 100 - sum(floors.values())
    for key in sorted(weights, key=lambda k: weights[k] - floors[k], reverse=True)[: max(0, left)]:
        floors[key] += 1
    return floors


HP_METRIC_ENV = "LLMOPS_HP_METRIC"  # which metric a tuning trial's runtime reports to Vertex (hypertune file)
_DISCRETE_MAX = 1000


def _grid(low: float, high: float, step: float) -> list[float]:
    count = int((high - low) / step + 1e-9) + 1
    if count > _DISCRETE_MAX:
        raise VertexConfigError(
            f"a range of {count} steps is more than Vertex's discrete values allow ({_DISCRETE_MAX})"
        )
    return [round(low + i * step, 12) for i in range(count)]


def parameter_spec(name: str, rng: Any) -> dict[str, Any]:
    """One search-space range as a ``StudySpec.ParameterSpec``: numeric choices and stepped ranges as discrete
    values, other choices as categorical strings (JSON for non-strings), log ranges on ``UNIT_LOG_SCALE``."""
    spec: dict[str, Any] = {"parameter_id": name}
    if rng.type == "categorical":
        numeric = all(isinstance(c, int | float) and not isinstance(c, bool) for c in rng.choices)
        if numeric:
            spec["discrete_value_spec"] = {"values": sorted({float(c) for c in rng.choices})}
        else:
            spec["categorical_value_spec"] = {
                "values": [c if isinstance(c, str) else json.dumps(c) for c in rng.choices]
            }
        return spec
    if rng.step is not None:
        spec["discrete_value_spec"] = {"values": _grid(float(rng.low), float(rng.high), float(rng.step))}
    elif rng.type == "int":
        spec["integer_value_spec"] = {"min_value": int(rng.low), "max_value": int(rng.high)}
    else:
        spec["double_value_spec"] = {"min_value": float(rng.low), "max_value": float(rng.high)}
    spec["scale_type"] = "UNIT_LOG_SCALE" if rng.log else "UNIT_LINEAR_SCALE"
    return spec


def tuning_job(tuning: Any, *, job_name: str, settings: VertexSettings) -> dict[str, Any]:
    """A ``HyperparameterTuningJob`` for a :class:`~airflow_llmops.specs.tuning.TuningSpec`: each trial is the
    training's custom job with the trial's values as ``--name=value`` arguments (the runtime applies them to the
    spec) and reports ``tuning.metric`` through Vertex's hypertune file; the TPE sampler as Vertex's default
    (Bayesian) algorithm, ``random`` as random search, the median pruner as median automated stopping. Each trial
    writes under ``<base_output_directory>/<trial id>/`` (``model/``, ``checkpoints/``)."""
    if tuning.initial_trials:
        raise VertexConfigError(
            "initial_trials cannot be given to a Vertex AI tuning job (its studies take no given points); remove "
            "them or tune on the local platform"
        )
    trial = custom_job(tuning.training, job_name=job_name, settings=settings)
    job_spec = trial["job_spec"]
    for pool in job_spec["worker_pool_specs"]:
        container = pool["container_spec"]
        env = [e for e in container["env"] if e["name"] != "LLMOPS_RESULT_URI"]  # one per job, not per trial
        container["env"] = [*env, {"name": HP_METRIC_ENV, "value": tuning.metric}]
    study: dict[str, Any] = {
        "metrics": [
            {"metric_id": tuning.metric, "goal": "MAXIMIZE" if tuning.resolved_direction == "maximize" else "MINIMIZE"}
        ],
        "parameters": [parameter_spec(name, rng) for name, rng in sorted(tuning.search_space.items())],
        "algorithm": "ALGORITHM_UNSPECIFIED" if tuning.sampler == "tpe" else "RANDOM_SEARCH",
        "measurement_selection_type": "LAST_MEASUREMENT",
    }
    if tuning.pruner == "median":
        study["median_automated_stopping_spec"] = {"use_elapsed_duration": False}
    return {
        "display_name": job_name,
        "labels": trial["labels"],
        "study_spec": study,
        "max_trial_count": tuning.n_trials,
        "parallel_trial_count": max(1, min(settings.max_parallel_trials, tuning.n_trials)),
        "trial_job_spec": job_spec,
    }


def logging_config(settings: VertexSettings) -> dict[str, Any] | None:
    """The endpoint's ``predict_request_response_logging_config`` (``None``: request-response logging off)."""
    uri = settings.request_response_logging_uri
    if not uri:
        return None
    if not re.fullmatch(r"bq://[a-z][a-z0-9-]{4,28}[a-z0-9](\.[A-Za-z0-9_]{1,1024}){0,2}", uri):
        raise VertexConfigError(
            f"request_response_logging_uri {uri!r} must be bq://project, bq://project.dataset or "
            "bq://project.dataset.table"
        )
    rate = settings.request_response_sampling_rate
    if not 0 < rate <= 1:
        raise VertexConfigError(f"request_response_sampling_rate {rate} must be in (0, 1]")
    return {"enabled": True, "sampling_rate": rate, "bigquery_destination": {"output_uri": uri}}

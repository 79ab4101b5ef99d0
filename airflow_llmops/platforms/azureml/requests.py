"""Azure ML requests built from our specs as plain dicts (the ``azure-ai-ml`` entities' keyword arguments): checked
before any API call, readable and testable as data. The adapter turns them into ``command()`` jobs,
``ManagedOnlineEndpoint`` and ``ManagedOnlineDeployment`` entities."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_llmops.platforms.base import registry_model_env
from airflow_llmops.specs import RolloutPlan, TrainingSpec

TAG_ENDPOINT = "llmops-endpoint"
TAG_VARIANT = "llmops-variant"
TAG_JOB = "llmops-job"
TAG_SOURCE = "llmops-source"
#: The runtime image serves on this port: liveness/readiness on SageMaker's ``/ping``, scoring on ``/invocations``
#: (the same JSON as the server's own routes).
SERVING_PORT = 8080
LIVENESS_ROUTE = "/ping"
SCORING_ROUTE = "/invocations"
#: Azure ML's limit on mirrored traffic: one deployment, at most this share of the live traffic.
MAX_MIRROR_PERCENT = 50
TRAIN_COMMAND = "python -m airflow_llmops.ml.runtime train"
TAG_METRIC = "llmops-metric"
#: The runtime's contract (``airflow_llmops.ml.runtime``; not imported here: it pulls the training stack).
PIPELINE_TRACKING_ENV = "LLMOPS_MLFLOW_TRACKING_URI"
TRIAL_OUTPUT_ENV = "LLMOPS_TRIAL_OUTPUT_URI"
HP_METRIC_ENV = "LLMOPS_HP_METRIC"
#: Azure ML names (jobs, endpoints, deployments): letters, digits and hyphens, starting with a letter.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_RESOURCE_GROUP = re.compile(r"^[-\w._()]{1,90}$")
_WORKSPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{2,32}$")
#: A compute cluster's name (Azure ML: 2-16 characters, letters, digits and hyphens, starting with a letter), or
#: a compute's ARM id.
_COMPUTE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,15}$")
_COMPUTE_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/workspaces/[^/]+"
    r"/computes/[A-Za-z][A-Za-z0-9-]{1,15}$"
)
_VM_SIZE = re.compile(r"^Standard_[A-Za-z0-9_]+$")
_ENVIRONMENT = re.compile(r"^(azureml:)?[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+|@latest)$")
#: Where job outputs, results and rollout records live: an fsspec URI the adapter and the runtime both reach.
_STORAGE_SCHEMES = ("abfs://", "abfss://", "az://", "file://", "/")
#: What a sweep's choice may not hold: it would end the quoted argument of the trial's command.
_UNSAFE_ARG = re.compile(r"['\x00-\x1f\x7f]")


class AzureMLConfigError(ValueError):
    """A setting the Azure ML platform needs is missing or wrong; the message says where to set it."""


@dataclass(frozen=True)
class AzureMLSettings:
    """What the adapter needs beyond the connection (JSON values only: credentials stay in the connection).

    :param azure_conn_id: an Airflow connection with the service principal (extra ``tenant_id``, login = client id,
        password = client secret, or extra ``client_id``/``client_secret``) and optionally ``subscription_id``,
        ``resource_group``, ``workspace_name``; no secret there: ``DefaultAzureCredential`` (managed identity, CLI).
    :param subscription_id: the workspace triple (here, or in the connection's extra).
    :param compute: the compute cluster's name (or ARM id) that runs training jobs.
    :param image: the runtime image built from ``docker/runtime.Dockerfile`` (ACR); jobs and deployments use it
        as an inline environment. ``environment`` (a registered ``name:version``) wins for training; serving uses
        it only without ``image`` (it must then carry the inference config: liveness/readiness ``/ping``, scoring
        ``/invocations`` on port 8080).
    :param output_uri: where job outputs, checkpoints, results and rollout records live (``abfs://container@
        account.dfs.core.windows.net/prefix``), read and written with fsspec by the adapter and the runtime.
    :param instance_type: the deployments' VM size; ``instance_count`` their instances (without autoscaling).
    :param max_parallel_trials: trials of a sweep job that run at once.
    """

    azure_conn_id: str | None = "azure_ml_default"
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    compute: str = ""
    image: str = ""
    environment: str | None = None
    output_uri: str = ""
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    experiment_name: str = "llmops"
    env: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    data_collection: bool = True
    wait_timeout_s: float = 3600.0
    poll_s: float = 15.0
    max_parallel_trials: int = 2

    def require(self, *names: str) -> None:
        hints = {
            "compute": "the compute cluster that runs training jobs, e.g. cpu-cluster",
            "image": "the runtime image, e.g. myregistry.azurecr.io/llmops/runtime:1.0",
            "output_uri": "where jobs and endpoints keep their files, e.g. abfs://llmops@myaccount.dfs.core.windows.net/"
            "llmops",
        }
        missing = [n for n in names if not getattr(self, n)]
        if "image" in missing and self.environment:
            missing.remove("image")
        if missing:
            raise AzureMLConfigError(
                "the azureml platform needs "
                + "; ".join(f"{n} ({hints.get(n, n)})" for n in missing)
                + ": set it in the operator's platform_options or in [llmops] azureml_<name>"
            )
        if "output_uri" in names and not self.output_uri.startswith(_STORAGE_SCHEMES):
            raise AzureMLConfigError(
                f"output_uri {self.output_uri!r} must be an abfs:// (or az://) URI of the workspace's storage account"
            )
        if "compute" in names:
            check_compute(self.compute)
        if self.environment:
            check_environment(self.environment)

    def path(self, *parts: str) -> str:
        return "/".join([self.output_uri.rstrip("/"), *(p.strip("/") for p in parts)])


def check_workspace(subscription_id: Any, resource_group: Any, workspace_name: Any) -> tuple[str, str, str]:
    """The workspace triple, all three present and well-formed."""
    given = {"subscription_id": subscription_id, "resource_group": resource_group, "workspace_name": workspace_name}
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise AzureMLConfigError(
            f"the azureml platform needs the workspace: {', '.join(missing)} missing; set them in platform_options, "
            "[llmops] azureml_<name> or the azure connection's extra"
        )
    if not _GUID.match(str(subscription_id)):
        raise AzureMLConfigError(f"subscription_id {subscription_id!r} is not a subscription GUID")
    if not _RESOURCE_GROUP.match(str(resource_group)) or str(resource_group).endswith("."):
        raise AzureMLConfigError(f"resource_group {resource_group!r} is not a resource group name")
    if not _WORKSPACE.match(str(workspace_name)):
        raise AzureMLConfigError(f"workspace_name {workspace_name!r} is not an Azure ML workspace name")
    return str(subscription_id), str(resource_group), str(workspace_name)


def check_compute(compute: str) -> str:
    if not (_COMPUTE.match(compute) or _COMPUTE_ID.match(compute)):
        raise AzureMLConfigError(
            f"compute {compute!r} is not a compute cluster name (2-16 letters, digits and hyphens, starting with a "
            "letter, e.g. cpu-cluster) or a compute's ARM id (/subscriptions/.../workspaces/WS/computes/NAME)"
        )
    return compute


def check_environment(environment: str) -> str:
    if not _ENVIRONMENT.match(environment):
        raise AzureMLConfigError(
            f"environment {environment!r} is not a registered environment: use name:version or name@latest"
        )
    return environment if environment.startswith("azureml:") else f"azureml:{environment}"


def check_instance_type(instance_type: str) -> str:
    if not _VM_SIZE.match(instance_type):
        raise AzureMLConfigError(
            f"instance_type {instance_type!r} is not an Azure VM size (e.g. Standard_DS3_v2, Standard_NC6s_v3)"
        )
    return instance_type


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise AzureMLConfigError(
            f"{what} {name!r} is not a valid Azure ML name: 3-32 letters, digits and hyphens, starting with a letter"
        )
    return name


def deployment_name(variant: str) -> str:
    """The Azure ML deployment of a variant (one deployment per version): the variant's name when Azure ML takes
    it (3-32 letters, digits and hyphens, starting with a letter), else a name derived from it (``v1`` →
    ``v1-<hash>``); the deployment's tag ``llmops-variant`` keeps the variant."""
    if _NAME.match(variant):
        return variant
    clean = re.sub(r"[^A-Za-z0-9-]+", "-", variant).strip("-")
    if not clean:
        raise AzureMLConfigError(f"variant {variant!r} has no letters or digits to name an Azure ML deployment")
    if not clean[0].isalpha():
        clean = f"v-{clean}"
    return f"{clean[:23].rstrip('-')}-{hashlib.sha256(variant.encode()).hexdigest()[:8]}"


def endpoint_name(endpoint: str) -> str:
    """An endpoint name Azure ML takes (3-32 letters, digits and hyphens, starting with a letter)."""
    if not _NAME.match(endpoint):
        raise AzureMLConfigError(
            f"endpoint_name {endpoint!r} is not valid on Azure ML: 3-32 letters, digits and hyphens, starting with a "
            "letter"
        )
    return endpoint


def source_tag(model_uri: str) -> str:
    return hashlib.sha256(model_uri.encode()).hexdigest()[:16]


def command_job(spec: TrainingSpec, *, job_name: str, settings: AzureMLSettings) -> dict[str, Any]:
    """``command()``'s keyword arguments: the runtime's ``train`` on ``nnodes`` instances of the compute cluster,
    one process per instance (the runtime runs torchrun with the spec's ``nproc_per_node`` under Azure ML's
    ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``), the low-priority (Spot) tier when the spec asks for spot; the
    spec, dataset, model, checkpoint and result locations in the environment (fsspec URIs under ``output_uri``:
    a preempted job resumes from its checkpoints there)."""
    settings.require("compute", "image", "output_uri")
    if not _JOB_NAME.match(job_name):
        raise AzureMLConfigError(f"job name {job_name!r} is not valid on Azure ML (letters, digits, '-' and '_')")
    dataset = str(spec.dataset_uri or "")
    if not dataset.startswith(_STORAGE_SCHEMES):
        raise AzureMLConfigError(
            f"the azureml platform reads the dataset from the workspace's storage, got {dataset!r}: give the prepare "
            "task an abfs:// artifact_root so the prepared dataset lands there"
        )
    if spec.distributed.instance_type:
        check_instance_type(spec.distributed.instance_type)
    output = settings.path("training", job_name)
    payload = spec.model_copy(update={"dataset_uri": None, "output_uri": None}).to_json()
    env = {
        **job_env(settings),
        "LLMOPS_SPEC": payload,
        "LLMOPS_DATASET_URI": dataset,
        "LLMOPS_MODEL_DIR": f"{output}/model",
        "LLMOPS_CHECKPOINT_DIR": f"{output}/checkpoints",
        "LLMOPS_RESULT_URI": f"{output}/llmops/result.json",
    }
    job: dict[str, Any] = {
        "name": job_name,
        "display_name": job_name,
        "experiment_name": settings.experiment_name,
        "command": TRAIN_COMMAND,
        "compute": settings.compute,
        "instance_count": spec.distributed.nnodes,
        "distribution": {"type": "pytorch", "process_count_per_instance": 1},
        "environment_variables": env,
        "tags": {**settings.tags, TAG_JOB: job_name},
    }
    if settings.environment:
        job["environment"] = check_environment(settings.environment)
    else:
        job["environment"] = {"image": settings.image}
    if spec.distributed.use_spot:
        job["queue_settings"] = {"job_tier": "Spot"}
    if spec.distributed.instance_type:
        job["instance_type"] = spec.distributed.instance_type
    return job


def job_env(settings: AzureMLSettings) -> dict[str, str]:
    """A job's environment from the settings' ``env``: the pipeline's MLflow server as
    ``$LLMOPS_MLFLOW_TRACKING_URI`` (empty: no tracking), because Azure ML sets ``MLFLOW_TRACKING_URI`` in every job
    to the workspace's own server, over what the job asks for; the runtime hands it to the training."""
    env = {k: str(v) for k, v in settings.env.items()}
    env[PIPELINE_TRACKING_ENV] = env.pop("MLFLOW_TRACKING_URI", "")
    return env


def input_name(param: str) -> str:
    """A search-space key as a job input's name (``lora.r`` → ``lora__r``: inputs are identifiers)."""
    return param.replace(".", "__")


def search_range(name: str, rng: Any, algorithm: str) -> dict[str, Any]:
    """One :class:`~airflow_llmops.specs.tuning.ParamRange` as an ``azure.ai.ml.sweep`` distribution: ``kind`` (the
    class) and its keyword arguments. Log ranges are ``LogUniform``/``QLogUniform`` over the natural logs of the
    bounds (Azure ML draws ``exp(uniform(min, max))``); stepped and integer ranges are quantized (``QUniform``, step
    1 for integers); choices are ``Choice`` (JSON text for lists and objects). Bayesian sampling takes choice,
    uniform and quniform only: a log range is refused for it before any call."""
    if rng.type == "categorical":
        values = [c if isinstance(c, str | int | float) else json.dumps(c) for c in rng.choices]
        unsafe = [v for v in values if isinstance(v, str) and _UNSAFE_ARG.search(v)]
        if unsafe:  # Azure ML pastes the value into the trial's shell command, inside single quotes
            raise AzureMLConfigError(
                f"search_space.{name} has choices Azure ML cannot pass on a command line: {unsafe} (single quotes, "
                "line breaks and control characters are refused)"
            )
        return {"kind": "Choice", "values": values}
    low, high = float(rng.low), float(rng.high)
    if rng.log:
        if algorithm == "bayesian":
            raise AzureMLConfigError(
                f"search_space.{name} is log-scaled, which Azure ML's Bayesian sampling (sampler='tpe') does not "
                "take (choice, uniform and quniform only): use sampler='random', or list the values as choices"
            )
        if rng.type == "int":
            return {"kind": "QLogUniform", "min_value": math.log(low), "max_value": math.log(high), "q": 1}
        return {"kind": "LogUniform", "min_value": math.log(low), "max_value": math.log(high)}
    if rng.type == "int" or rng.step is not None:
        return {"kind": "QUniform", "min_value": low, "max_value": high, "q": rng.step or 1}
    return {"kind": "Uniform", "min_value": low, "max_value": high}


def sweep_job(tuning: Any, *, job_name: str, settings: AzureMLSettings) -> dict[str, Any]:
    """A sweep job for a :class:`~airflow_llmops.specs.tuning.TuningSpec`: the training's command job
    (:func:`command_job`) as the trial, the trial's values as ``--name=value`` arguments (the runtime applies them
    to the spec), ``tuning.metric`` as the primary metric (the runtime logs it to the trial's MLflow run in Azure
    ML's workspace), each trial's outputs under ``<output_uri>/tuning/<job>/<trial run id>/``.

    ``tpe`` → Bayesian sampling, ``random`` → random; the ``median`` pruner → a median stopping policy on every
    reported evaluation; ``timeout_s`` → the sweep's own timeout; ``max_parallel_trials`` concurrent trials.
    ``initial_trials`` has no Azure ML equivalent and is refused before any call."""
    if tuning.initial_trials:
        raise AzureMLConfigError(
            "initial_trials has no Azure ML equivalent (a sweep samples every trial): remove it, or tune on the "
            "local platform"
        )
    algorithm = "bayesian" if tuning.sampler == "tpe" else "random"
    space = {name: search_range(name, rng, algorithm) for name, rng in tuning.search_space.items()}
    job = command_job(tuning.training, job_name=job_name, settings=settings)
    env = job["environment_variables"]
    for name in ("LLMOPS_MODEL_DIR", "LLMOPS_CHECKPOINT_DIR", "LLMOPS_RESULT_URI"):
        env.pop(name)
    env[TRIAL_OUTPUT_ENV] = settings.path("tuning", job_name)
    env[HP_METRIC_ENV] = tuning.metric
    # Quoted: a choice may hold spaces or JSON; Azure ML substitutes the value into the command line as text.
    args = "".join(f" '--{name}=${{{{inputs.{input_name(name)}}}}}'" for name in space)
    job["command"] = TRAIN_COMMAND + args
    job["tags"] = {**job["tags"], TAG_METRIC: tuning.metric}
    limits: dict[str, Any] = {
        "max_total_trials": tuning.n_trials,
        "max_concurrent_trials": max(1, min(settings.max_parallel_trials, tuning.n_trials)),
    }
    if tuning.timeout_s:
        limits["timeout"] = math.ceil(tuning.timeout_s)
    sweep: dict[str, Any] = {
        "search_space": space,
        "sampling_algorithm": algorithm,
        "primary_metric": tuning.metric,
        "goal": "Maximize" if tuning.resolved_direction == "maximize" else "Minimize",
        "limits": limits,
    }
    if tuning.pruner == "median":
        sweep["early_termination"] = {"kind": "MedianStoppingPolicy", "evaluation_interval": 1, "delay_evaluation": 1}
    return {"trial": job, "sweep": sweep}


def serving_environment(settings: AzureMLSettings) -> dict[str, Any] | str:
    """The deployment's environment: the runtime image with the routes Azure ML calls (liveness and readiness
    ``GET /ping``, scoring ``POST /invocations``, port 8080), or the registered one when no image is given."""
    if settings.image:
        route = {"port": SERVING_PORT}
        return {
            "image": settings.image,
            "inference_config": {
                "liveness_route": {**route, "path": LIVENESS_ROUTE},
                "readiness_route": {**route, "path": LIVENESS_ROUTE},
                "scoring_route": {**route, "path": SCORING_ROUTE},
            },
        }
    if settings.environment:
        return check_environment(settings.environment)
    raise AzureMLConfigError("the azureml platform needs image (or a registered environment) to serve models")


def autoscale_setting(endpoint: str, deployment: str, deployment_id: str, plan: RolloutPlan) -> dict[str, Any] | None:
    """Managed online deployments take only default scale settings (a fixed ``instance_count``); they autoscale
    through an Azure Monitor autoscale setting on the deployment. From ``plan.autoscaling``: instances between its
    bounds, one more above the CPU target (``target_cpu_percent``, default 70 %) over 5 minutes, one fewer below
    half of it; cooldowns from the plan (Azure's minimum: one minute). None without autoscaling."""
    scaling = plan.autoscaling
    if scaling is None:
        return None
    target = scaling.target_cpu_percent or 70

    def rule(operator: str, threshold: float, direction: str, cooldown_s: int) -> dict[str, Any]:
        return {
            "metric_trigger": {
                "metric_name": "CpuUtilizationPercentage",
                "metric_resource_uri": deployment_id,
                "time_grain_s": 60,
                "statistic": "Average",
                "time_window_s": 300,
                "time_aggregation": "Average",
                "operator": operator,
                "threshold": threshold,
            },
            "scale_action": {
                "direction": direction,
                "type": "ChangeCount",
                "value": "1",
                "cooldown_s": max(60, cooldown_s),
            },
        }

    return {
        "name": autoscale_name(endpoint, deployment),
        "enabled": True,
        "target_resource_uri": deployment_id,
        "profiles": [
            {
                "name": "llmops",
                "capacity": {
                    "minimum": str(scaling.min_instances),
                    "maximum": str(scaling.max_instances),
                    "default": str(scaling.min_instances),
                },
                "rules": [
                    rule("GreaterThan", float(target), "Increase", scaling.scale_out_cooldown_s),
                    rule("LessThan", float(max(5, target // 2)), "Decrease", scaling.scale_in_cooldown_s),
                ],
            }
        ],
    }


def autoscale_name(endpoint: str, deployment: str) -> str:
    return f"llmops-{endpoint}-{deployment}"


def online_deployment(
    endpoint: str, variant: str, model_uri: str, plan: RolloutPlan, *, settings: AzureMLSettings
) -> dict[str, Any]:
    """``ManagedOnlineDeployment``'s keyword arguments: the runtime image serving ``model_uri`` (a storage folder
    the server downloads, or an MLflow registry version), data collection on, default scale settings (autoscaling
    is an Azure Monitor setting: :func:`autoscale_setting`)."""
    name = deployment_name(variant)
    check_instance_type(settings.instance_type)
    env = {k: str(v) for k, v in settings.env.items()}
    if model_uri.startswith(("abfs://", "abfss://", "az://", "file://")):
        env["LLMOPS_MODEL_STORAGE_URI"] = model_uri.rstrip("/")
    elif model_uri.startswith("models:/"):
        registry_model_env(model_uri, env, AzureMLConfigError)
    else:
        raise AzureMLConfigError(
            f"model_uri {model_uri!r}: Azure ML deployments serve models from the workspace's storage (abfs://...) "
            "or from the MLflow registry (models:/name/version); a local folder cannot reach an endpoint"
        )
    env["LLMOPS_VARIANT_NAME"] = variant
    if settings.output_uri:  # the server ships its request log there on rotation: drift reads it from any cloud
        env["LLMOPS_REQUEST_LOG_SHIP_URI"] = settings.path("endpoints", endpoint, "requests")
    count = plan.autoscaling.min_instances if plan.autoscaling is not None else settings.instance_count
    body: dict[str, Any] = {
        "name": name,
        "endpoint_name": endpoint,
        "environment": serving_environment(settings),
        "environment_variables": env,
        "instance_type": settings.instance_type,
        "instance_count": count,
        "scale_settings": {"type": "default"},  # managed deployments autoscale through Azure Monitor instead
        "tags": {**settings.tags, TAG_ENDPOINT: endpoint, TAG_VARIANT: variant, TAG_SOURCE: source_tag(model_uri)},
    }
    if settings.data_collection:
        # Payload logging (the HTTP requests and responses): a custom container runs no collection SDK of its own.
        body["data_collector"] = {"collections": {"request": True, "response": True}}
    return body


def whole_percents(weights: Mapping[str, float]) -> dict[str, int]:
    """Azure ML takes whole percentages summing to 100: anything else is refused here, before any call."""
    out: dict[str, int] = {}
    for name, value in weights.items():
        if float(value) != int(value):
            raise AzureMLConfigError(
                f"Azure ML endpoint traffic takes whole percentages, got {name}={value:g} in {dict(weights)}"
            )
        out[name] = int(value)
    total = sum(out.values())
    if total != 100:
        raise ValueError(f"traffic weights must sum to 100, got {dict(weights)} (sum {total})")
    return out


def mirror(shadow: str, percent: float, *, current: Mapping[str, int] | None = None) -> dict[str, int]:
    """``mirror_traffic`` for a shadow deployment: one deployment, a whole percentage in 1..50 (Azure ML's limit),
    never one that takes live traffic."""
    if float(percent) != int(percent) or not 0 < percent <= MAX_MIRROR_PERCENT:
        raise AzureMLConfigError(
            f"Azure ML mirrors at most {MAX_MIRROR_PERCENT} % of the traffic, in whole percents, to one deployment: "
            f"{shadow} at {percent:g} % cannot; lower the plan's shadow_percent"
        )
    others = sorted(k for k, v in (current or {}).items() if v and k != shadow)
    if others:
        raise AzureMLConfigError(
            f"Azure ML mirrors traffic to one deployment only: {others} is mirrored already; finish that shadow first"
        )
    return {shadow: int(percent)}


def check_mirror(mirror_traffic: Mapping[str, float], traffic: Mapping[str, float]) -> dict[str, int]:
    """A whole ``mirror_traffic`` map as Azure ML accepts it: at most one deployment, at most 50 %, and not one that
    takes live traffic."""
    live = {k for k, v in traffic.items() if v}
    mirrored = {k: v for k, v in mirror_traffic.items() if v}
    if len(mirrored) > 1:
        raise AzureMLConfigError(
            f"Azure ML mirrors traffic to one deployment only, got {dict(mirror_traffic)}; keep one shadow"
        )
    for name, value in mirrored.items():
        mirror(name, value)
        if name in live:
            raise AzureMLConfigError(f"deployment {name} takes live traffic; Azure ML cannot mirror to it as well")
    return {k: int(v) for k, v in mirrored.items()}

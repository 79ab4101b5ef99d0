"""The platform protocol: what an operator asks of local, SageMaker, Vertex AI or Azure ML.

Handles and statuses are plain JSON-serialisable records so that triggers can carry them between the
worker and the triggerer, and a retry can re-attach to the job or endpoint its first try started.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from typing_extensions import Self

from airflow_llmops.specs import RolloutPlan, TrainingSpec

T = TypeVar("T")
PlatformName = Literal["local", "sagemaker", "vertex", "azureml"]
PLATFORM_NAMES: tuple[str, ...] = ("local", "sagemaker", "vertex", "azureml")


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class _Record:
    """JSON round-trip for the protocol's dataclasses (enums by value, unknown keys rejected)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]
        for key, value in out.items():
            if isinstance(value, enum.Enum):
                out[key] = value.value
        return dict(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class JobHandle(_Record):
    """Identifies a training job on a platform: enough to poll, cancel or describe it from any process."""

    platform: str
    job_id: str
    job_name: str
    console_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatus(_Record):
    state: JobState
    message: str = ""
    progress: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, JobState):
            object.__setattr__(self, "state", JobState(self.state))


@dataclass(frozen=True)
class EndpointHandle(_Record):
    platform: str
    endpoint_name: str
    url: str | None = None
    console_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantMetrics(_Record):
    """One variant's live numbers over a window, as every platform's monitoring can report them."""

    variant: str
    requests: int
    errors: int
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    window_seconds: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@runtime_checkable
class TrainingPlatform(Protocol):
    """Training half of the protocol. ``submit_training`` is idempotent on ``job_name``: a second call for a
    name that already has a job returns that job's handle instead of starting a duplicate."""

    name: str

    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle: ...

    def get_training_status(self, handle: JobHandle) -> JobStatus: ...

    def cancel_training(self, handle: JobHandle) -> None: ...

    def describe_training(self, handle: JobHandle) -> dict[str, Any]: ...


class DeploymentError(RuntimeError):
    """An endpoint could not be started or changed; the message says what the platform answered."""


class PlatformApiError(RuntimeError):
    """A cloud API refused a call that may succeed later (quota, throttling, the service unavailable): the
    message names the call, the resource and what the service answered. A task retry may get through."""


class PlatformRefusedError(PlatformApiError, ValueError):
    """A cloud API refused a call that will be refused again (permission, authentication, an invalid argument):
    the message names the call, the resource and what the service answered. A ``ValueError``: operators fail the
    task without retrying."""


class EndpointChangedError(DeploymentError):
    """The endpoint changed under a rollout step (its server restarted, its split was reset): the step's numbers
    cannot be trusted and the rollout must not continue from them."""


@dataclass(frozen=True)
class PlatformCapabilities(_Record):
    """What a platform's endpoints can do, so an operator refuses a plan it cannot honour before touching traffic.

    :param traffic_split: weighted traffic between versions of one endpoint (canary, linear, blue/green steps).
    :param shadow: mirrored copies of requests to a version whose answers are not returned.
    :param native_guarded_deployment: the platform walks the steps itself with alarm-based rollback (SageMaker
        blue/green deployment configs); the rollout then watches instead of stepping.
    :param autoscaling: instance counts follow the load.
    """

    traffic_split: bool = True
    shadow: bool = False
    native_guarded_deployment: bool = False
    autoscaling: bool = False

    def refuse(self, plan: RolloutPlan, platform: str) -> str | None:
        """Why ``plan`` cannot run on this platform, or None."""
        if plan.native_guardrails and not self.native_guarded_deployment:
            return (
                f"platform {platform!r} has no guarded deployment of its own, so native_guardrails=True cannot run "
                "there; leave it False (the rollout steps and judges the traffic itself)"
            )
        if plan.autoscaling is not None and not self.autoscaling:
            return f"platform {platform!r} cannot autoscale endpoints; remove the plan's autoscaling"
        if plan.strategy == "shadow" and not self.shadow:
            return (
                f"platform {platform!r} cannot mirror traffic, so rollout strategy 'shadow' cannot run there; "
                "use 'canary' or 'blue_green'"
            )
        if plan.strategy in ("canary", "linear") and not self.traffic_split:
            return (
                f"platform {platform!r} cannot split traffic between versions, so rollout strategy "
                f"{plan.strategy!r} cannot run there; use 'blue_green' or 'all_at_once'"
            )
        return None


ROLLOUT_IN_PROGRESS = "in_progress"
ROLLOUT_TERMINAL = ("succeeded", "rolled_back", "failed")


@dataclass
class RolloutRecord(_Record):
    """A rollout's progress, kept on the endpoint (a file next to the local server, tags on a cloud endpoint) so
    that whoever acts next (a retry, another worker, a restarted triggerer) knows where the walk stands.

    ``previous`` is the traffic split before the rollout: rolling back restores exactly it. ``step`` indexes the
    plan's steps; ``step_started_at`` is None until that step's traffic is set. ``state`` is ``in_progress`` or
    one of ``succeeded``, ``rolled_back``, ``failed`` (failed and left in place: ``auto_rollback=False``).
    ``pause`` is the last pause request (``{"state": "paused" | "resumed", "by", "at", "reason", ...}``), written
    only by :func:`~airflow_llmops.platforms.rollout.pause_rollout` / ``resume_rollout`` and carried over by the
    walk's own writes (:func:`~airflow_llmops.platforms.rollout.save_record`).
    """

    rollout_id: str
    variant: str
    model_uri: str
    previous: dict[str, float]
    plan: dict[str, Any]
    state: str = ROLLOUT_IN_PROGRESS
    step: int = 0
    step_started_at: float | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    message: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1
    pause: dict[str, Any] | None = None

    @property
    def in_progress(self) -> bool:
        return self.state == ROLLOUT_IN_PROGRESS


@runtime_checkable
class DeploymentPlatform(Protocol):
    """Deployment half of the protocol: versions behind an endpoint, traffic between them, and their health.

    Weights are percentages per variant summing to 100 (:func:`validate_weights`). Every method may be called
    from any process: what a later call needs is on the endpoint (its record), not in the adapter object.
    """

    name: str
    capabilities: PlatformCapabilities

    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        """Load ``model_uri`` as ``variant`` next to the serving version at 0 % (the endpoint's first version
        takes 100 %). The handle's ``extra["previous"]`` holds the serving split; deploying again is a no-op."""
        ...

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None: ...

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]: ...

    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        """Per variant, the requests that finished at or after ``since`` (unix seconds)."""
        ...

    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        """Restore exactly ``previous`` (the split before the rollout), then remove ``failed_variant``."""
        ...

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        """Promote: ``new_variant`` takes everything and the old versions are unloaded (``keep_new=False``, a
        shadow rollout: the new variant is removed and the serving split stays)."""
        ...

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]: ...

    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None: ...

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None: ...


@runtime_checkable
class GuardedDeploymentPlatform(Protocol):
    """A platform that walks a rollout itself and rolls back on its own alarms (``native_guardrails``).

    ``deploy`` prepares the new version without sending it traffic; :meth:`start_guarded_deployment` starts the
    platform's deployment (idempotent: a second call while it runs, or after it ended, changes nothing);
    :meth:`guarded_deployment_state` says where it stands: ``("in_progress" | "succeeded" | "rolled_back",
    message)``. ``rollback`` during a guarded deployment makes the platform roll it back."""

    def start_guarded_deployment(self, handle: EndpointHandle, *, variant: str, plan: RolloutPlan) -> None: ...

    def guarded_deployment_state(self, handle: EndpointHandle, *, variant: str) -> tuple[str, str]: ...


def settings_from(cls: type[T], options: Mapping[str, Any], *, platform: str, error: type[ValueError]) -> T:
    """An adapter's settings dataclass from its JSON keyword arguments; unknown names are refused by name (a typo
    in ``platform_options`` must not be ignored)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise error(f"unknown {platform} platform options {unknown}; use some of {sorted(known)}")
    return cls(**options)


_UNSAFE = re.compile(r"[^a-z0-9-]+")
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def validate_endpoint_name(name: str) -> str:
    """An endpoint name every platform accepts and that is safe as a folder name: letters, digits and inner
    hyphens, at most 63 characters (SageMaker's and Azure ML's limit)."""
    if not isinstance(name, str) or not _ENDPOINT_NAME.match(name):
        raise ValueError(
            f"endpoint_name {name!r} is not valid: use 1-63 letters, digits and inner hyphens "
            "(no dots, slashes or spaces), e.g. 'chatterbot-topics'"
        )
    return name


def job_name_for(dag_id: str, run_id: str, task_id: str, *, max_length: int = 63) -> str:
    """A deterministic job name for one task of one DAG run, valid on every platform.

    Retries of the same task instance get the same name (so they re-attach); different runs, tasks or DAGs
    get different names. Cloud limits: SageMaker 63 chars ``[a-zA-Z0-9-]``, Vertex and Azure ML similar.
    """
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}\x00{task_id}".encode()).hexdigest()[:10]
    readable = _UNSAFE.sub("-", f"{dag_id}-{task_id}".lower()).strip("-") or "job"
    keep = max_length - len(digest) - 1
    return f"{readable[:keep].rstrip('-')}-{digest}"


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Check a traffic split (percent per variant) and return it normalised to floats."""
    if not weights:
        raise ValueError("traffic weights are empty; give at least one variant")
    bad = {k: v for k, v in weights.items() if not 0 <= float(v) <= 100}
    if bad:
        raise ValueError(f"traffic weights must lie in [0, 100] percent, got {bad}")
    total = sum(float(v) for v in weights.values())
    if abs(total - 100.0) > 1e-6:
        raise ValueError(f"traffic weights must sum to 100, got {dict(weights)} (sum {total:g})")
    return {k: float(v) for k, v in weights.items()}


# -- records on an object store (the cloud adapters keep them next to their jobs and endpoints) --------------------
def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def read_json_uri(uri: str) -> dict[str, Any]:
    """The JSON object at ``uri`` (a path, ``file://``, ``gs://``, ``abfs://``...; read with fsspec); ``{}`` when it
    is missing or unreadable (e.g. a job's result record not written yet)."""
    try:
        fs, path = _fs(uri)
        with fs.open(path, "r") as fh:
            loaded = json.load(fh)
    except (OSError, ValueError):
        return {}
    return dict(loaded) if isinstance(loaded, dict) else {}


def load_rollout_record(uri: str) -> RolloutRecord | None:
    """The rollout record stored at ``uri`` (``None``: no rollout yet)."""
    fs, path = _fs(uri)
    try:
        with fs.open(path, "r") as fh:
            return RolloutRecord.from_dict(json.load(fh))
    except FileNotFoundError:
        return None


def save_rollout_record(uri: str, record: RolloutRecord) -> None:
    """Store ``record`` at ``uri`` (stamped with the time)."""
    record.updated_at = time.time()
    fs, path = _fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(json.dumps(record.to_dict(), indent=2, sort_keys=True))


def registry_model_env(model_uri: str, env: dict[str, str], error: type[ValueError]) -> None:
    """A registry version (``models:/name/3``) is loaded by the cloud endpoint's server from MLflow: set
    ``LLMOPS_MODEL_URI`` in its ``env``, which must name the MLflow server (``error`` otherwise)."""
    if not env.get("MLFLOW_TRACKING_URI"):
        raise error(
            f"model {model_uri} is in the MLflow registry: the endpoint needs MLFLOW_TRACKING_URI in the "
            "platform's env (an MLflow server the endpoint can reach)"
        )
    env["LLMOPS_MODEL_URI"] = model_uri

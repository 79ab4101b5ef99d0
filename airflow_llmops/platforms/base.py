"""The platform protocol: what an operator asks of local, SageMaker, Vertex AI or Azure ML.

Handles and statuses are plain JSON-serialisable records so that triggers can carry them between the
worker and the triggerer, and a retry can re-attach to the job or endpoint its first try started.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

from typing_extensions import Self

from airflow_llmops.specs import RolloutPlan, TrainingSpec

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


@runtime_checkable
class DeploymentPlatform(Protocol):
    """Deployment half of the protocol: versions behind an endpoint, traffic between them, and their health."""

    name: str

    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle: ...

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None: ...

    def read_metrics(self, handle: EndpointHandle, *, variants: list[str]) -> list[VariantMetrics]: ...

    def rollback(self, handle: EndpointHandle, *, failed_variant: str) -> None: ...

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]: ...


_UNSAFE = re.compile(r"[^a-z0-9-]+")


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

"""Platform adapters behind one protocol (local, SageMaker, Vertex AI, Azure ML)."""

from typing import Any

from airflow_llmops.platforms.base import (
    PLATFORM_NAMES,
    DeploymentPlatform,
    EndpointHandle,
    JobHandle,
    JobState,
    JobStatus,
    TrainingPlatform,
    VariantMetrics,
    job_name_for,
    validate_weights,
)


def get_platform(name: str, **kwargs: Any) -> TrainingPlatform:
    """Build the adapter for ``name`` from JSON-serialisable kwargs (what a trigger carries between processes)."""
    if name == "local":
        from airflow_llmops.platforms.local import LocalPlatform

        return LocalPlatform(**kwargs)
    if name in PLATFORM_NAMES:
        raise ValueError(
            f"platform {name!r} has no training adapter in this version of airflow-llmops yet; "
            "use platform='local' (available: local)"
        )
    raise ValueError(f"unknown platform {name!r}; use one of {', '.join(PLATFORM_NAMES)}")


__all__ = [
    "PLATFORM_NAMES",
    "DeploymentPlatform",
    "EndpointHandle",
    "JobHandle",
    "JobState",
    "JobStatus",
    "TrainingPlatform",
    "VariantMetrics",
    "get_platform",
    "job_name_for",
    "validate_weights",
]

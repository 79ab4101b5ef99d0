"""Platform adapters behind one protocol (local, SageMaker, Vertex AI, Azure ML)."""

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

__all__ = [
    "PLATFORM_NAMES",
    "DeploymentPlatform",
    "EndpointHandle",
    "JobHandle",
    "JobState",
    "JobStatus",
    "TrainingPlatform",
    "VariantMetrics",
    "job_name_for",
    "validate_weights",
]

"""Platform adapters behind one protocol (local, SageMaker, Vertex AI, Azure ML), found through one registry.

Adapters register under the entry-point group ``airflow_llmops.platforms`` (name -> a callable taking the
adapter's JSON-serialisable keyword arguments), so a third-party package can add a platform without touching this
one. :func:`get_platform` is the only way the Airflow layer reaches a concrete platform.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from airflow_llmops.platforms.base import (
    PLATFORM_NAMES,
    DeploymentError,
    DeploymentPlatform,
    EndpointChangedError,
    EndpointHandle,
    GuardedDeploymentPlatform,
    JobHandle,
    JobState,
    JobStatus,
    PlatformApiError,
    PlatformCapabilities,
    PlatformRefusedError,
    RolloutRecord,
    TrainingPlatform,
    VariantMetrics,
    job_name_for,
    validate_endpoint_name,
    validate_weights,
)

ENTRY_POINT_GROUP = "airflow_llmops.platforms"
# Used when the package's metadata is not installed (running from a source tree); the entry points say the same.
_BUILTIN = {
    "local": "airflow_llmops.platforms.localhost:LocalHost",
    "sagemaker": "airflow_llmops.platforms.sagemaker:SageMaker",
    "vertex": "airflow_llmops.platforms.vertex:Vertex",
    "azureml": "airflow_llmops.platforms.azureml:AzureML",
}
_registered: dict[str, Callable[..., Any]] = {}


def register_platform(name: str, factory: Callable[..., Any]) -> None:
    """Add (or replace) a platform at run time, e.g. from a plugin; packages use the entry-point group."""
    _registered[name] = factory


def available_platforms() -> list[str]:
    """Names that :func:`get_platform` can build here."""
    names = set(_BUILTIN) | set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def _factory(name: str) -> Callable[..., Any]:
    if name in _registered:
        return _registered[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()  # type: ignore[no-any-return]
    if name in _BUILTIN:
        module, _, attr = _BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    available = ", ".join(available_platforms())
    if name in PLATFORM_NAMES:
        raise ValueError(
            f"platform {name!r} has no adapter in this version of airflow-llmops yet; use one of: {available}"
        )
    raise ValueError(
        f"unknown platform {name!r}; use one of: {available} (a package can add one under the entry-point group "
        f"{ENTRY_POINT_GROUP!r})"
    )


def get_platform(name: str, **kwargs: Any) -> Any:
    """Build the adapter for ``name`` from JSON-serialisable kwargs (what a trigger carries between processes).

    The object implements :class:`TrainingPlatform`, :class:`DeploymentPlatform` or both; use
    :func:`training_platform` / :func:`deployment_platform` to get one half with a clear error when it is missing.
    """
    return _factory(name)(**kwargs)


def training_platform(name: str, **kwargs: Any) -> TrainingPlatform:
    platform = get_platform(name, **kwargs)
    if not isinstance(platform, TrainingPlatform):
        raise ValueError(f"platform {name!r} cannot run training jobs (its adapter has no training half)")
    return platform


def deployment_platform(name: str, **kwargs: Any) -> DeploymentPlatform:
    platform = get_platform(name, **kwargs)
    if not isinstance(platform, DeploymentPlatform):
        raise ValueError(f"platform {name!r} cannot serve endpoints (its adapter has no deployment half)")
    return platform


__all__ = [
    "ENTRY_POINT_GROUP",
    "PLATFORM_NAMES",
    "DeploymentError",
    "DeploymentPlatform",
    "EndpointChangedError",
    "EndpointHandle",
    "GuardedDeploymentPlatform",
    "JobHandle",
    "JobState",
    "JobStatus",
    "PlatformApiError",
    "PlatformCapabilities",
    "PlatformRefusedError",
    "RolloutRecord",
    "TrainingPlatform",
    "VariantMetrics",
    "available_platforms",
    "deployment_platform",
    "get_platform",
    "job_name_for",
    "register_platform",
    "training_platform",
    "validate_endpoint_name",
    "validate_weights",
]

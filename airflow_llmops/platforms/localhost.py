"""The ``local`` platform as one adapter: training jobs are torchrun process groups, endpoints are
``airflow-llmops serve`` processes, everything recorded in folders any Airflow component can read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_llmops.platforms.base import (
    EndpointHandle,
    JobHandle,
    JobStatus,
    PlatformCapabilities,
    RolloutRecord,
    VariantMetrics,
)
from airflow_llmops.platforms.local import LocalPlatform
from airflow_llmops.platforms.local_serving import LocalEndpoints
from airflow_llmops.specs import RolloutPlan, TrainingSpec


class LocalHost:
    """Both halves of the protocol on this machine.

    :param jobs_root: folder of training jobs (needed for training).
    :param endpoints_root: folder of endpoints (needed for deployment).
    :param env: extra environment of jobs and servers (e.g. ``MLFLOW_TRACKING_URI``).
    :param port, host, advertise_host, test_faults, redact_output_pii: see :class:`LocalEndpoints`.
    """

    name = "local"
    capabilities: PlatformCapabilities = LocalEndpoints.capabilities

    def __init__(
        self,
        *,
        jobs_root: str | Path | None = None,
        endpoints_root: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        python: str | None = None,
        test_faults: bool = False,
        redact_output_pii: bool = False,
    ) -> None:
        env = dict(env or {})
        self._training = LocalPlatform(jobs_root, env=env, python=python) if jobs_root is not None else None
        self._endpoints = (
            LocalEndpoints(
                endpoints_root,
                env=env,
                port=port,
                host=host,
                advertise_host=advertise_host,
                python=python,
                test_faults=test_faults,
                redact_output_pii=redact_output_pii,
            )
            if endpoints_root is not None
            else None
        )

    @property
    def training(self) -> LocalPlatform:
        if self._training is None:
            raise ValueError("the local platform needs jobs_root to run training jobs")
        return self._training

    @property
    def endpoints(self) -> LocalEndpoints:
        if self._endpoints is None:
            raise ValueError("the local platform needs endpoints_root to serve endpoints")
        return self._endpoints

    # -- training --------------------------------------------------------------------------------------------
    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle:
        return self.training.submit_training(spec, job_name=job_name)

    def get_training_status(self, handle: JobHandle) -> JobStatus:
        return self.training.get_training_status(handle)

    def cancel_training(self, handle: JobHandle) -> None:
        self.training.cancel_training(handle)

    def describe_training(self, handle: JobHandle) -> dict[str, Any]:
        return self.training.describe_training(handle)

    # -- deployment ------------------------------------------------------------------------------------------
    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        return self.endpoints.deploy(endpoint_name, model_uri=model_uri, variant=variant, plan=plan)

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        self.endpoints.set_traffic(handle, weights)

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]:
        return self.endpoints.get_traffic(handle)

    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        return self.endpoints.read_metrics(handle, variants=variants, since=since)

    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        self.endpoints.rollback(handle, failed_variant=failed_variant, previous=previous)

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        self.endpoints.finish(handle, new_variant=new_variant, keep_new=keep_new)

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        return self.endpoints.describe_endpoint(handle)

    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None:
        return self.endpoints.get_rollout_record(endpoint_name)

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None:
        self.endpoints.put_rollout_record(endpoint_name, record)

    def stop_endpoint(self, endpoint_name: str) -> None:
        """Stop the endpoint's server (its folder stays: starting it again brings back the same variants)."""
        self.endpoints.stop_server(endpoint_name)

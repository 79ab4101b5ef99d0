"""DeployModelOperator: load a model version next to what an endpoint serves, ready for a gradual rollout."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import EndpointLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, airflow_home
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.specs import RolloutPlan, SpecValidationError

if TYPE_CHECKING:
    from airflow.sdk import Context

_VERSION = re.compile(r"^models:/[^/@]+/(\d+)$")


def default_endpoints_root() -> str:
    return conf.get("llmops", "local_endpoints_root", fallback="") or os.path.join(
        airflow_home(), "llmops", "endpoints"
    )


class DeployModelOperator(LLMOpsBaseOperator):
    """Put ``model_uri`` behind ``endpoint_name`` as a new variant that takes no traffic yet (``shadow``: a
    mirrored copy of it), next to the variant serving now; :class:`~airflow_llmops.sensors.rollout.
    RolloutHealthSensor` then moves traffic step by step and rolls back on a breach. The first model of an
    endpoint takes all traffic at once. On the local platform the endpoint is an ``airflow-llmops serve``
    process that outlives the task. Returns the rollout (endpoint handle, plan, variant) for the sensor.

    :param model_uri: ``models:/<name>/<version>`` (or ``@alias``), or a model folder (templated).
    :param endpoint_name: the endpoint (templated).
    :param rollout: :class:`~airflow_llmops.specs.RolloutPlan` or a mapping / JSON of one (templated).
    :param variant: the new variant's name; default ``v<version>`` for a registry version (templated).
    :param port: port of a new local endpoint (an existing one keeps its port).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_uri",
        "endpoint_name",
        "rollout",
        "variant",
        "mlflow_tracking_uri",
        "endpoints_root",
    )
    operator_extra_links = (EndpointLink(),)
    ui_color = "#fce4ec"

    def __init__(
        self,
        *,
        model_uri: str,
        endpoint_name: str,
        rollout: RolloutPlan | Mapping[str, Any] | str | None = None,
        variant: str | None = None,
        endpoints_root: str | None = None,
        port: int | None = None,
        mlflow_tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.endpoint_name = endpoint_name
        self.rollout = rollout
        self.variant = variant
        self.endpoints_root = endpoints_root
        self.port = port
        self.mlflow_tracking_uri = mlflow_tracking_uri

    def platform_kwargs(self) -> dict[str, Any]:
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        return {
            "endpoints_root": self.endpoints_root or default_endpoints_root(),
            "env": {"MLFLOW_TRACKING_URI": tracking} if tracking else {},
            "port": self.port,
        }

    def variant_name(self, context: Context) -> str:
        if self.variant:
            return str(self.variant)
        match = _VERSION.match(str(self.model_uri))
        return f"v{match.group(1)}" if match else self.job_name(context)[-16:].strip("-")

    def execute(self, context: Context) -> dict[str, Any]:
        if self.check_platform() != "local":
            raise AirflowFailException(f"{self.task_id}: no deployment adapter for {self.platform!r} yet; use 'local'")
        try:
            plan = RolloutPlan.parse(self.rollout or {})
        except SpecValidationError as err:
            raise AirflowFailException(str(err)) from None
        from airflow_llmops.platforms.local_serving import DeploymentError, LocalEndpoints

        kwargs = self.platform_kwargs()
        platform = LocalEndpoints(**kwargs)
        variant = self.variant_name(context)
        try:
            handle = platform.deploy(str(self.endpoint_name), model_uri=str(self.model_uri), variant=variant, plan=plan)
        except DeploymentError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        if handle.url:
            EndpointLink().persist(context, f"{handle.url}/docs")
        previous = handle.extra.get("previous") or {}
        self.log.info(
            "Endpoint %s at %s: %s loaded next to %s; strategy %s, steps %s",
            handle.endpoint_name,
            handle.url,
            variant,
            previous or "nothing (first model: it takes all traffic)",
            plan.strategy,
            plan.steps(),
        )
        return {
            "handle": handle.to_dict(),
            "plan": plan.to_dict(),
            "platform_kwargs": kwargs,
            "variant": variant,
            "model_uri": str(self.model_uri),
            "url": handle.url,
        }

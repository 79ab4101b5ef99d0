"""DeployModelOperator: load a model version next to what an endpoint serves, ready for a gradual rollout."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import EndpointLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, airflow_home, cloud_platform_kwargs
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
    :param platform_options: extra keyword arguments of the platform's adapter (local: ``host``,
        ``advertise_host``, ``redact_output_pii`` (redact personal data in generated text; set when the endpoint's
        server starts); JSON values only, never credentials: those belong in ``platform_conn_id``).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_uri",
        "endpoint_name",
        "rollout",
        "variant",
        "mlflow_tracking_uri",
        "endpoints_root",
        "platform_options",
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
        platform_options: Mapping[str, Any] | None = None,
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
        self.platform_options = dict(platform_options or {})

    def platform_kwargs(self) -> dict[str, Any]:
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        if self.check_platform() != "local":
            # The endpoint loads registry versions from MLflow itself: it needs the tracking server's address.
            env = {"MLFLOW_TRACKING_URI": tracking} if tracking else {}
            return cloud_platform_kwargs(self.platform, self.platform_conn_id, self.platform_options, env=env)
        host = conf.get("llmops", "local_endpoints_host", fallback="") or None
        advertise = conf.get("llmops", "local_endpoints_advertise_host", fallback="") or None
        return {
            "endpoints_root": self.endpoints_root or default_endpoints_root(),
            "env": {"MLFLOW_TRACKING_URI": tracking} if tracking else {},
            "port": self.port,
            **({"host": host} if host else {}),
            **({"advertise_host": advertise} if advertise else {}),
            **self.platform_options,
        }

    def variant_name(self, context: Context) -> str:
        if self.variant:
            return str(self.variant)
        match = _VERSION.match(str(self.model_uri))
        return f"v{match.group(1)}" if match else self.job_name(context)[-16:].strip("-")

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.platforms import DeploymentError, deployment_platform, validate_endpoint_name

        try:
            plan = RolloutPlan.parse(self.rollout or {})
            endpoint_name = validate_endpoint_name(str(self.endpoint_name))
        except (SpecValidationError, ValueError) as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        kwargs = self.platform_kwargs()
        try:
            platform = deployment_platform(self.check_platform(), **kwargs)
        except ValueError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        refused = platform.capabilities.refuse(plan, platform.name)
        if refused:
            raise AirflowFailException(f"{self.task_id}: {refused}")
        variant = self.variant_name(context)
        try:
            self._roll_back_stale(platform, endpoint_name, variant)
            handle = platform.deploy(endpoint_name, model_uri=str(self.model_uri), variant=variant, plan=plan)
        except (DeploymentError, ValueError) as err:  # ValueError: a setting or name the platform refuses
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        link = f"{handle.url}/docs" if platform.name == "local" else (handle.console_url or handle.url)
        if link:
            EndpointLink().persist(context, link)
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
            "platform": platform.name,
            "handle": handle.to_dict(),
            "plan": plan.to_dict(),
            "platform_kwargs": kwargs,
            "variant": variant,
            "model_uri": str(self.model_uri),
            "url": handle.url,
        }

    def _roll_back_stale(self, platform: Any, endpoint_name: str, variant: str) -> None:
        """A rollout of another version still recorded as in progress (its worker was killed and never came
        back) would leave a split: restore the weights from before it first."""
        from airflow_llmops.platforms import EndpointHandle

        record = platform.get_rollout_record(endpoint_name)
        if record is None or not record.in_progress or record.variant == variant:
            return
        self.log.warning(
            "Endpoint %s: the rollout of %s (%s) never finished; restoring the weights from before it (%s)",
            endpoint_name,
            record.variant,
            record.rollout_id,
            record.previous,
        )
        handle = EndpointHandle(platform=platform.name, endpoint_name=endpoint_name)
        platform.rollback(handle, failed_variant=record.variant, previous=record.previous)
        record.state = "rolled_back"
        record.message = f"abandoned at step {record.step + 1}; rolled back before deploying {variant}"
        platform.put_rollout_record(endpoint_name, record)

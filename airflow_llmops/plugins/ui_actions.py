"""The LLMOps page's actions, through the same code paths as the pipeline: a rollback goes through the platform
adapter's :meth:`~airflow_llmops.platforms.base.DeploymentPlatform.rollback` (exactly the weights from before the
rollout come back, the new variant is removed) and is written to the endpoint's rollout record; a promotion moves
the alias with :func:`airflow_llmops.ml.registry.move_alias` (recorded in the alias history); a pause or resume is a
request written to the rollout record (:func:`~airflow_llmops.platforms.rollout.pause_rollout`), which the running
``RolloutOperator`` reads at every poll.

Authorisation is the caller's (:mod:`.ui`): these functions only find the owner and act."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_llmops.plugins import ui_data


class ActionError(RuntimeError):
    """The action cannot be taken in the endpoint's or model's state; the message says why."""


@dataclass(frozen=True)
class EndpointTarget:
    platform: str
    name: str
    owner: str | None
    platform_kwargs: dict[str, Any]


def endpoint_target(platform: str, name: str) -> EndpointTarget:
    """The endpoint and the DAG that owns it (the one whose run started its last rollout)."""
    from airflow_llmops.platforms import deployment_platform, validate_endpoint_name

    try:
        validate_endpoint_name(name)
    except ValueError as err:
        raise LookupError(str(err)) from None
    if platform == "local":
        root = ui_data.endpoints_root()
        if not (root / name).is_dir():
            raise LookupError(f"no local endpoint {name!r}")
        kwargs: dict[str, Any] = {"endpoints_root": str(root)}
    else:
        from airflow.sdk import conf

        from airflow_llmops.operators.base import cloud_platform_kwargs

        listed = {s.strip() for s in conf.get("llmops", "ui_endpoints", fallback="").split(",")}
        if f"{platform}:{name}" not in listed:
            raise LookupError(f"endpoint {platform}:{name} is not listed in [llmops] ui_endpoints")
        kwargs = cloud_platform_kwargs(platform, None)
    record = deployment_platform(platform, **kwargs).get_rollout_record(name)
    return EndpointTarget(platform, name, ui_data.owner_dag(record.rollout_id) if record else None, kwargs)


def rollback(target: EndpointTarget, *, who: str, reason: str) -> dict[str, Any]:
    """Roll back the endpoint's last rollout: in progress, or failed and left in place (``auto_rollback=False``).
    Returns the weights before and after."""
    from airflow_llmops.platforms import EndpointHandle, deployment_platform
    from airflow_llmops.platforms.rollout import roll_back

    platform = deployment_platform(target.platform, **target.platform_kwargs)
    record = platform.get_rollout_record(target.name)
    if record is None:
        raise ActionError(f"endpoint {target.name} has no rollout recorded: nothing to roll back")
    if record.state not in ("in_progress", "failed"):
        raise ActionError(
            f"the last rollout of endpoint {target.name} ({record.variant}) ended as {record.state}: nothing to roll "
            "back (deploy the previous version to go back to it)"
        )
    if not record.previous:
        raise ActionError(f"endpoint {target.name}: no split from before the rollout is recorded")
    handle = EndpointHandle(target.platform, target.name)
    if target.platform == "local":
        from airflow_llmops.jsonfiles import read_json_object

        server = read_json_object(ui_data.endpoints_root() / target.name / "server.json") or {}
        handle = EndpointHandle(target.platform, target.name, url=server.get("url"))
    before = platform.get_traffic(handle)
    message = (
        f"rolled back from the LLMOps page by {who}: {reason}; {record.variant} removed, {record.previous} serving"
    )
    roll_back(platform, handle, record, message)
    after = platform.get_traffic(handle)
    return {"variant": record.variant, "before": before, "after": after, "rollout_id": record.rollout_id}


def _pausable(target: EndpointTarget) -> Any:
    from airflow_llmops.platforms import deployment_platform

    return deployment_platform(target.platform, **target.platform_kwargs)


def pause(target: EndpointTarget, *, who: str, reason: str) -> dict[str, Any]:
    """Hold the endpoint's rollout in progress at its current step (the walk reads the request from the record)."""
    from airflow_llmops.platforms.rollout import RolloutPauseError, pause_rollout

    try:
        record = pause_rollout(_pausable(target), target.name, by=who, reason=reason)
    except RolloutPauseError as err:
        raise ActionError(str(err)) from None
    return {"variant": record.variant, "step": record.step, "rollout_id": record.rollout_id, "message": record.message}


def resume(target: EndpointTarget, *, who: str) -> dict[str, Any]:
    """Let the endpoint's paused rollout go on (the held step bakes again from now)."""
    from airflow_llmops.platforms.rollout import RolloutPauseError, resume_rollout

    try:
        record = resume_rollout(_pausable(target), target.name, by=who)
    except RolloutPauseError as err:
        raise ActionError(str(err)) from None
    return {"variant": record.variant, "step": record.step, "rollout_id": record.rollout_id, "message": record.message}


def version_owner(name: str, version: str) -> str | None:
    """The DAG whose run registered ``name`` version ``version`` (its ``llmops.dag_run`` tag)."""
    uri = ui_data.tracking_uri()
    if not uri or not version.isdigit():
        raise LookupError(f"no version {version!r} of {name!r} (or no MLflow tracking URI)")
    from mlflow.exceptions import MlflowException

    try:
        mv = ui_data._mlflow_client(uri).get_model_version(name, version)
    except MlflowException:
        raise LookupError(f"registered model {name!r} has no version {version}") from None
    dag_run = str((mv.tags or {}).get(ui_data.VERSION_TAGS["dag_run"], ""))
    return dag_run.split("/", 1)[0] if "/" in dag_run else None


def promote(name: str, version: str, alias: str, *, who: str) -> dict[str, Any]:
    from airflow_llmops.ml import registry

    uri = ui_data.tracking_uri()
    if registry.current_version(name, alias, tracking_uri=uri) == version:
        raise ActionError(f"{name}@{alias} already points at version {version}")
    try:
        return registry.move_alias(
            name, alias, version, tracking_uri=uri, reason=f"promoted from the LLMOps page by {who}"
        )
    except registry.RegistryError as err:
        raise ActionError(str(err)) from None

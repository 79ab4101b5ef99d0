"""The Azure ML adapter: command jobs, managed online endpoints and deployments through ``azure-ai-ml``'s
``MLClient``, Azure Monitor metrics through ``azure-mgmt-monitor``'s ``MonitorManagementClient``.

Credentials come from an Airflow connection (``azure_conn_id``: a service principal in its extra ``tenant_id`` /
``client_id`` / ``client_secret`` (or login and password), else ``DefaultAzureCredential``: managed identity, the
CLI); the workspace triple from the settings or the connection's extra. Jobs are found by name (derived from the
Airflow task, so a retry re-attaches). Versions are deployments whose tag ``llmops-variant`` is the variant; the
rollout steps the endpoint's ``traffic`` (whole percents) and shadows through ``mirror_traffic``. Azure ML has no
bake or rollback of its own: the rollout (judged on Azure Monitor) is the guardrail.

Tests only: :data:`client_factory` replaces the connection (credential and an in-process transport).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import Any

from airflow_llmops.platforms.azureml import requests as R
from airflow_llmops.platforms.azureml.requests import AzureMLConfigError, AzureMLSettings
from airflow_llmops.platforms.base import (
    DeploymentError,
    EndpointHandle,
    JobHandle,
    JobState,
    JobStatus,
    PlatformApiError,
    PlatformCapabilities,
    PlatformRefusedError,
    RolloutRecord,
    VariantMetrics,
    load_rollout_record,
    read_json_uri,
    save_rollout_record,
    settings_from,
    validate_endpoint_name,
    validate_weights,
)
from airflow_llmops.specs import RolloutPlan, TrainingSpec

#: Tests only (never set in production code): ``settings -> {"credential": ..., "transport": ..., and optionally
#: "subscription_id", "resource_group", "workspace_name"}``, called for each client instead of reading the Airflow
#: connection. Keeps credentials and transports out of the settings (which travel as JSON through XCom).
client_factory: Callable[[AzureMLSettings], dict[str, Any]] | None = None

_STATES = {
    "NotStarted": JobState.PENDING,
    "Starting": JobState.PENDING,
    "Provisioning": JobState.PENDING,
    "Preparing": JobState.PENDING,
    "Queued": JobState.PENDING,
    "Running": JobState.RUNNING,
    "Finalizing": JobState.RUNNING,
    "CancelRequested": JobState.RUNNING,
    "NotResponding": JobState.RUNNING,
    "Paused": JobState.RUNNING,
    "Unknown": JobState.RUNNING,
    "Completed": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "Canceled": JobState.CANCELLED,
}
_METRIC_REQUESTS = "RequestsPerMinute"
_METRIC_P50 = "RequestLatency_P50"
_METRIC_P95 = "RequestLatency_P95"


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AzureML:
    """``platform="azureml"``. Keyword arguments are :class:`AzureMLSettings` fields (JSON values)."""

    name = "azureml"
    # Mirrored traffic (one deployment, at most 50 %); no guarded deployment of its own.
    capabilities = PlatformCapabilities(
        traffic_split=True, shadow=True, native_guarded_deployment=False, autoscaling=True
    )

    def __init__(self, **settings: Any) -> None:
        self.settings = settings_from(AzureMLSettings, settings, platform="azureml", error=AzureMLConfigError)
        self._clients: dict[str, Any] = {}
        self._workspace: tuple[str, str, str] | None = None
        self._trial_results: dict[str, dict[str, Any]] = {}  # an ended trial's result file does not change

    # -- clients --------------------------------------------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        """The credential (and, in tests, the transport) plus the workspace triple from the connection."""
        if client_factory is not None:
            return dict(client_factory(self.settings))
        from airflow.sdk import BaseHook

        conn_id = self.settings.azure_conn_id or "azure_ml_default"
        conn = BaseHook.get_connection(conn_id)
        extra = dict(conn.extra_dejson)

        def pick(*names: str) -> str | None:
            for name in names:
                # Plain keys, as the connection form saves them; the prefixed forms of older connections.
                value = extra.get(name) or extra.get(f"extra__azure__{name}") or extra.get(f"extra__azure_ml__{name}")
                if value:
                    return str(value)
            return None

        tenant = pick("tenant_id", "tenantId")
        client_id = pick("client_id", "clientId") or conn.login
        secret = pick("client_secret", "clientSecret") or conn.password
        if tenant and client_id and secret:
            from azure.identity import ClientSecretCredential

            credential: Any = ClientSecretCredential(tenant_id=tenant, client_id=client_id, client_secret=secret)
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential(
                managed_identity_client_id=pick("managed_identity_client_id"),
                workload_identity_tenant_id=pick("workload_identity_tenant_id"),
            )
        return {
            "credential": credential,
            "subscription_id": pick("subscription_id", "subscriptionId"),
            "resource_group": pick("resource_group", "resource_group_name"),
            "workspace_name": pick("workspace_name", "workspace"),
        }

    def _split(self) -> tuple[Any, dict[str, Any]]:
        kwargs = self._client_kwargs()
        credential = kwargs.pop("credential")
        found = {k: kwargs.pop(k, None) for k in ("subscription_id", "resource_group", "workspace_name")}
        if self._workspace is None:
            self._workspace = R.check_workspace(
                self.settings.subscription_id or found["subscription_id"],
                self.settings.resource_group or found["resource_group"],
                self.settings.workspace_name or found["workspace_name"],
            )
        return credential, kwargs

    @property
    def workspace(self) -> tuple[str, str, str]:
        if self._workspace is None:
            self._split()
        assert self._workspace is not None
        return self._workspace

    def ml(self) -> Any:
        if "ml" not in self._clients:
            from azure.ai.ml import MLClient

            credential, kwargs = self._split()
            sub, rg, ws = self.workspace
            self._clients["ml"] = MLClient(
                credential, sub, rg, ws, enable_telemetry=False, show_progress=False, **kwargs
            )
        return self._clients["ml"]

    def monitor(self) -> Any:
        if "monitor" not in self._clients:
            from azure.mgmt.monitor import MonitorManagementClient

            credential, kwargs = self._split()
            self._clients["monitor"] = MonitorManagementClient(credential, self.workspace[0], **kwargs)
        return self._clients["monitor"]

    @property
    def _workspace_id(self) -> str:
        sub, rg, ws = self.workspace
        return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/workspaces/{ws}"

    def _studio(self, fragment: str) -> str:
        return f"https://ml.azure.com/{fragment}?wsid={self._workspace_id}"

    @staticmethod
    def _not_found(err: Exception) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        return isinstance(err, ResourceNotFoundError)

    def _wait(self, poller: Any, what: str) -> Any:
        try:
            return poller.result(timeout=self.settings.wait_timeout_s)
        except Exception as err:
            raise DeploymentError(f"Azure ML could not finish {what}: {_reason(err)}") from err

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; a refusal raises :class:`PlatformRefusedError` (permission, authentication, an
        invalid argument: the task fails without retrying) or :class:`PlatformApiError` (quota, throttling, the
        service unavailable: a retry may pass), naming ``what`` (the call and the resource) and the workspace.
        ``missing_ok``: a 404 returns None."""
        try:
            return fn(*args, **kwargs)
        except (DeploymentError, PlatformApiError, AzureMLConfigError):
            raise
        except Exception as err:
            if missing_ok and self._not_found(err):
                return None
            raise _api_error(err, f"Azure ML {what} (workspace {self.workspace[2]})") from err

    # == training ==============================================================================================
    def _command(self, body: Mapping[str, Any]) -> Any:
        from azure.ai.ml import PyTorchDistribution, command
        from azure.ai.ml.entities import Environment, QueueSettings

        kwargs = dict(body)
        distribution = kwargs.pop("distribution")
        kwargs["distribution"] = PyTorchDistribution(
            process_count_per_instance=distribution["process_count_per_instance"]
        )
        if isinstance(kwargs["environment"], dict):
            kwargs["environment"] = Environment(image=kwargs["environment"]["image"])
        if "queue_settings" in kwargs:
            kwargs["queue_settings"] = QueueSettings(**kwargs["queue_settings"])
        return command(**kwargs)

    def _find_job(self, job_name: str) -> Any | None:
        return self._call(f"reading job {job_name}", self.ml().jobs.get, job_name, missing_ok=True)

    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle:
        body = R.command_job(spec, job_name=job_name, settings=self.settings)  # refuses bad input before any call
        job = self._find_job(job_name)
        if job is None:
            job = self._call(f"creating command job {job_name}", self.ml().jobs.create_or_update, self._command(body))
        output = self.settings.path("training", job_name)
        return JobHandle(
            platform=self.name,
            job_id=str(job.name),
            job_name=job_name,
            console_url=getattr(job, "studio_url", None) or self._studio(f"runs/{job.name}"),
            extra={"output": output},
        )

    def _job(self, handle: JobHandle) -> Any:
        return self._call(f"reading job {handle.job_id}", self.ml().jobs.get, handle.job_id)

    def _result(self, handle: JobHandle) -> dict[str, Any]:
        """What the runtime wrote at the end (metrics, MLflow run id; or the failure and the last log lines)."""
        return read_json_uri(f"{handle.extra.get('output', '')}/llmops/result.json")

    def get_training_status(self, handle: JobHandle) -> JobStatus:
        job = self._job(handle)
        state = _STATES.get(_status(job), JobState.RUNNING)
        if state is JobState.SUCCEEDED:
            result = self._result(handle)
            metrics = {k: float(v) for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
            return JobStatus(state, "succeeded", metrics=metrics, model_uri=f"{handle.extra['output']}/model")
        if state is JobState.FAILED:
            result = self._result(handle)
            message = result.get("message") or f"Azure ML job {handle.job_id} failed (see {handle.console_url})"
            tail = result.get("log_tail") or []
            return JobStatus(state, str(message) + (("\nlast log lines:\n" + "\n".join(tail)) if tail else ""))
        return JobStatus(state, _status(job))

    def cancel_training(self, handle: JobHandle) -> None:
        job = self._job(handle)
        if _STATES.get(_status(job), JobState.RUNNING).is_terminal:
            return
        poller = self._call(f"cancelling job {handle.job_id}", self.ml().jobs.begin_cancel, handle.job_id)
        with contextlib.suppress(Exception):  # the cancel is accepted; the job ends on its own time
            poller.result(timeout=min(self.settings.wait_timeout_s, 60.0))

    def describe_training(self, handle: JobHandle) -> dict[str, Any]:
        job = self._job(handle)
        state = _STATES.get(_status(job), JobState.RUNNING)
        return {
            "status": {"state": state.value, **(self._result(handle) if state.is_terminal else {})},
            "azureml": {"name": job.name, "status": _status(job), "compute": getattr(job, "compute", None)},
            "console_url": handle.console_url,
        }

    # == tuning (sweep jobs) ===================================================================================
    def _sweep(self, body: Mapping[str, Any]) -> Any:
        """The sweep job entity: the trial's command with one input per searched value, swept by
        ``azure.ai.ml.sweep`` distributions (the SDK turns ``${{inputs.x}}`` into ``${{search_space.x}}``)."""
        from azure.ai.ml import sweep as S

        trial, sweep = dict(body["trial"]), body["sweep"]
        space = {R.input_name(name): dict(d) for name, d in sweep["search_space"].items()}
        defaults = {k: (d["values"][0] if d["kind"] == "Choice" else d["min_value"]) for k, d in space.items()}
        node = self._command({**trial, "inputs": defaults})
        distributions = {k: getattr(S, d.pop("kind"))(**d) for k, d in space.items()}
        policy = None
        if sweep.get("early_termination"):
            options = dict(sweep["early_termination"])
            policy = getattr(S, options.pop("kind"))(**options)
        job = node(**distributions).sweep(
            compute=trial["compute"],
            sampling_algorithm=sweep["sampling_algorithm"],
            primary_metric=sweep["primary_metric"],
            goal=sweep["goal"],
            early_termination_policy=policy,
        )
        job.set_limits(**sweep["limits"])
        job.name = trial["name"]
        job.display_name = trial["display_name"]
        job.experiment_name = trial["experiment_name"]
        job.tags = dict(trial["tags"])
        return job

    def submit_tuning(self, tuning: Any, *, job_name: str) -> dict[str, Any]:
        """Start (or find, on a retry) the sweep job for a :class:`~airflow_llmops.specs.tuning.TuningSpec` (see
        :func:`requests.sweep_job`)."""
        body = R.sweep_job(tuning, job_name=job_name, settings=self.settings)  # refuses bad input before any call
        job = self._find_job(job_name)
        if job is None:
            job = self._call(f"creating sweep job {job_name}", self.ml().jobs.create_or_update, self._sweep(body))
        return {
            "job_name": job_name,
            "resource": str(job.name),
            "console_url": getattr(job, "studio_url", None) or self._studio(f"runs/{job.name}"),
        }

    def _trials(self, job_name: str, metric: str) -> list[dict[str, Any]]:
        """The sweep's trials (child jobs, from Azure ML's run history) with what each trial's runtime recorded
        (the values it trained with, its metrics) under ``<output_uri>/tuning/<job>/<trial>/``."""
        children = self._call(
            f"listing the trials of sweep job {job_name}",
            lambda: [c for c in self.ml().jobs.list(parent_job_name=job_name) if c is not None],
        )
        base = self.settings.path("tuning", job_name)
        trials = []
        for child in sorted(children, key=lambda c: str(c.name)):
            status = _status(child)
            state = _STATES.get(status, JobState.RUNNING)
            result: dict[str, Any] = {}
            if state.is_terminal:
                uri = f"{base}/{child.name}/llmops/result.json"
                result = self._trial_results.get(uri) or read_json_uri(uri)
                if result:  # read once, not on every poll of the sweep (an absent file is read again)
                    self._trial_results[uri] = result
            value = (result.get("metrics") or {}).get(metric)
            trials.append(
                {
                    "trial": str(child.name),
                    "training_job": str(child.name),
                    "status": status,
                    "params": {k.replace("__", "."): v for k, v in (result.get("tuned") or {}).items()},
                    "value": float(value) if isinstance(value, int | float) and state is JobState.SUCCEEDED else None,
                    "model_uri": f"{base}/{child.name}/model" if state is JobState.SUCCEEDED else None,
                    "message": result.get("message"),
                }
            )
        return trials

    def tuning_status(self, job_name: str) -> dict[str, Any]:
        """``state`` (a JobState value), ``message``, the trials by status and the best trial so far (Azure ML's
        ``best_child_run_id`` once the sweep has one, else the best scored trial)."""
        job = self._find_job(job_name)
        if job is None:
            return {"state": JobState.FAILED.value, "message": f"sweep job {job_name} does not exist"}
        status = _status(job)
        objective = getattr(job, "objective", None)
        metric = str(getattr(objective, "primary_metric", "") or (job.tags or {}).get(R.TAG_METRIC, ""))
        maximize = str(getattr(objective, "goal", "maximize")).lower() == "maximize"
        trials = self._trials(job_name, metric)
        counters: dict[str, int] = {}
        for trial in trials:
            counters[trial["status"]] = counters.get(trial["status"], 0) + 1
        scored = [t for t in trials if t["value"] is not None]
        named = (job.properties or {}).get("best_child_run_id")
        best = next((t for t in scored if t["trial"] == named), None)
        if best is None and scored:
            best = (max if maximize else min)(scored, key=lambda t: t["value"])
        failed = [f"{t['trial']}: {t['message']}" for t in trials if t["message"] and t["value"] is None]
        return {
            "state": _STATES.get(status, JobState.RUNNING).value,
            "message": status + (("; " + "; ".join(failed[:3])) if failed else ""),
            "counters": counters,
            "best": best,
        }

    def tuning_trials(self, job_name: str) -> list[dict[str, Any]]:
        job = self._find_job(job_name)
        if job is None:
            return []
        metric = str(getattr(getattr(job, "objective", None), "primary_metric", "") or "")
        return self._trials(job_name, metric)

    def stop_tuning(self, job_name: str) -> None:
        job = self._find_job(job_name)
        if job is None or _STATES.get(_status(job), JobState.RUNNING).is_terminal:
            return
        poller = self._call(f"cancelling sweep job {job_name}", self.ml().jobs.begin_cancel, job_name)
        with contextlib.suppress(Exception):  # the cancel is accepted; the trials end on their own time
            poller.result(timeout=min(self.settings.wait_timeout_s, 60.0))

    # == deployment ============================================================================================
    def _get_endpoint(self, endpoint: str) -> Any | None:
        return self._call(f"reading endpoint {endpoint}", self.ml().online_endpoints.get, endpoint, missing_ok=True)

    def _endpoint(self, handle: EndpointHandle) -> Any:
        found = self._get_endpoint(handle.endpoint_name)
        if found is None:
            raise DeploymentError(f"endpoint {handle.endpoint_name} does not exist in Azure ML ({self._workspace_id})")
        return found

    def _deployments(self, endpoint: str) -> dict[str, Any]:
        """Variant -> deployment (ours: tagged with the variant), in the service's order."""
        listed = self._call(
            f"listing the deployments of endpoint {endpoint}", lambda: list(self.ml().online_deployments.list(endpoint))
        )
        out: dict[str, Any] = {}
        for dep in listed:
            out[(dep.tags or {}).get(R.TAG_VARIANT) or dep.name] = dep
        return out

    @staticmethod
    def _live(ep: Any, deps: Mapping[str, Any]) -> dict[str, float]:
        """The live split per variant (mirrored deployments left out: they take no live traffic)."""
        traffic = {k.lower(): v for k, v in (ep.traffic or {}).items()}
        mirrored = {k.lower() for k, v in (ep.mirror_traffic or {}).items() if v}
        return {
            variant: float(traffic.get(dep.name.lower(), 0))
            for variant, dep in deps.items()
            if dep.name.lower() not in mirrored
        }

    def _handle(self, endpoint: str, ep: Any, **extra: Any) -> EndpointHandle:
        return EndpointHandle(
            platform=self.name,
            endpoint_name=endpoint,
            url=getattr(ep, "scoring_uri", None),
            console_url=self._studio(f"endpoints/realtime/{endpoint}/detail"),
            extra={"resource": getattr(ep, "id", None), **extra},
        )

    def _deployment_entity(self, body: Mapping[str, Any]) -> Any:
        from azure.ai.ml.entities import (
            DataCollector,
            DefaultScaleSettings,
            DeploymentCollection,
            Environment,
            ManagedOnlineDeployment,
        )

        kwargs = dict(body)
        environment = kwargs["environment"]
        if isinstance(environment, dict):
            kwargs["environment"] = Environment(
                image=environment["image"], inference_config=environment["inference_config"]
            )
        kwargs.pop("scale_settings")
        kwargs["scale_settings"] = DefaultScaleSettings()
        if "data_collector" in kwargs:
            collections = kwargs.pop("data_collector")["collections"]
            kwargs["data_collector"] = DataCollector(
                collections={k: DeploymentCollection(enabled="true" if v else "false") for k, v in collections.items()}
            )
        return ManagedOnlineDeployment(**kwargs)

    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        endpoint = R.endpoint_name(validate_endpoint_name(endpoint_name))
        self.settings.require("output_uri")
        body = R.online_deployment(endpoint, variant, model_uri, plan, settings=self.settings)
        name = body["name"]
        if plan.strategy == "shadow":
            R.mirror(name, plan.shadow_percent)  # Azure's limit, before any call
        ep = self._get_endpoint(endpoint)
        if ep is None:
            entity = ManagedOnlineEndpoint(
                name=endpoint, auth_mode="key", tags={**self.settings.tags, R.TAG_ENDPOINT: endpoint}
            )
            ep = self._wait(
                self._call(f"creating endpoint {endpoint}", self.ml().online_endpoints.begin_create_or_update, entity),
                f"creating endpoint {endpoint}",
            )
        deps = self._deployments(endpoint)
        previous = {v: w for v, w in self._live(ep, deps).items() if v != variant}
        plan_extra = {"previous": previous, "plan": plan.to_dict()}
        if variant in deps:  # deployed already (a retry)
            return self._handle(endpoint, ep, **plan_extra)
        if plan.strategy == "shadow":
            if not any(previous.values()):
                raise DeploymentError(f"endpoint {endpoint} serves nothing yet: a shadow needs a live deployment")
            R.mirror(name, plan.shadow_percent, current=ep.mirror_traffic or {})
        self._wait(
            self._call(
                f"deploying {variant} to {endpoint}",
                self.ml().online_deployments.begin_create_or_update,
                self._deployment_entity(body),
            ),
            f"deploying {variant} to {endpoint} (deployment {name})",
        )
        self._autoscale(endpoint, name, plan)
        ep = self._endpoint_by_name(endpoint)
        if not deps:  # the first version takes everything
            self._update_endpoint(ep, traffic={name: 100}, what=f"sending all traffic to {variant}")
        elif plan.strategy == "shadow":
            mirror = R.mirror(name, plan.shadow_percent, current=ep.mirror_traffic or {})
            self._update_endpoint(ep, mirror=mirror, what=f"mirroring {plan.shadow_percent:g} % to {variant}")
        return self._handle(endpoint, self._endpoint_by_name(endpoint), **plan_extra)

    def _autoscale(self, endpoint: str, deployment: str, plan: RolloutPlan) -> None:
        """The plan's autoscaling as an Azure Monitor autoscale setting on the deployment."""
        deployment_id = f"{self._workspace_id}/onlineEndpoints/{endpoint}/deployments/{deployment}"
        body = R.autoscale_setting(endpoint, deployment, deployment_id, plan)
        if body is None:
            return
        from azure.mgmt.monitor import models as M

        def trigger(t: Mapping[str, Any]) -> Any:
            return M.MetricTrigger(
                metric_name=t["metric_name"],
                metric_resource_uri=t["metric_resource_uri"],
                time_grain=dt.timedelta(seconds=t["time_grain_s"]),
                statistic=t["statistic"],
                time_window=dt.timedelta(seconds=t["time_window_s"]),
                time_aggregation=t["time_aggregation"],
                operator=t["operator"],
                threshold=t["threshold"],
            )

        profiles = [
            M.AutoscaleProfile(
                name=p["name"],
                capacity=M.ScaleCapacity(**p["capacity"]),
                rules=[
                    M.ScaleRule(
                        metric_trigger=trigger(r["metric_trigger"]),
                        scale_action=M.ScaleAction(
                            direction=r["scale_action"]["direction"],
                            type=r["scale_action"]["type"],
                            value=r["scale_action"]["value"],
                            cooldown=dt.timedelta(seconds=r["scale_action"]["cooldown_s"]),
                        ),
                    )
                    for r in p["rules"]
                ],
            )
            for p in body["profiles"]
        ]
        ws = self.ml().workspaces.get(self.workspace[2])
        resource = M.AutoscaleSettingResource(
            location=ws.location,
            profiles=profiles,
            enabled=True,
            target_resource_uri=body["target_resource_uri"],
            name_properties_name=body["name"],
            tags={R.TAG_ENDPOINT: endpoint},
        )
        self._call(
            f"autoscaling deployment {deployment}",
            self.monitor().autoscale_settings.create_or_update,
            self.workspace[1],
            body["name"],
            resource,
        )

    def _unscale(self, endpoint: str, deployment: str) -> None:
        name = R.autoscale_name(endpoint, deployment)
        self._call(
            f"deleting autoscale setting {name}",
            self.monitor().autoscale_settings.delete,
            self.workspace[1],
            name,
            missing_ok=True,
        )

    def _endpoint_by_name(self, endpoint: str) -> Any:
        found = self._get_endpoint(endpoint)
        if found is None:
            raise DeploymentError(f"endpoint {endpoint} does not exist in Azure ML ({self._workspace_id})")
        return found

    def _update_endpoint(
        self,
        ep: Any,
        *,
        traffic: Mapping[str, int] | None = None,
        mirror: Mapping[str, int] | None = None,
        what: str,
    ) -> None:
        """Set the endpoint's live split and/or mirror (deployment names); checked as Azure ML checks it first."""
        live = dict(traffic) if traffic is not None else {k: int(v) for k, v in (ep.traffic or {}).items()}
        mirrored = dict(mirror) if mirror is not None else {k: int(v) for k, v in (ep.mirror_traffic or {}).items()}
        if live and sum(live.values()) != 100:
            raise ValueError(f"traffic weights must sum to 100, got {live}")
        R.check_mirror(mirrored, live)
        ep.traffic = live
        ep.mirror_traffic = mirrored
        self._wait(
            self._call(f"{what} on {ep.name}", self.ml().online_endpoints.begin_create_or_update, ep),
            f"{what} on endpoint {ep.name}",
        )

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        weights = validate_weights(weights)
        whole = R.whole_percents(weights)  # Azure ML takes whole percents only: refused before any call
        ep = self._endpoint(handle)
        deps = self._deployments(handle.endpoint_name)
        unknown = sorted(set(whole) - set(deps))
        if unknown:
            raise DeploymentError(
                f"endpoint {handle.endpoint_name} has no deployments {unknown}; it has {sorted(deps)}"
            )
        live = self._live(ep, deps)
        split = {deps[v].name: whole.get(v, 0) for v in deps if v in live}
        self._update_endpoint(ep, traffic=split, what=f"setting traffic {whole}")

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]:
        ep = self._endpoint(handle)
        return self._live(ep, self._deployments(handle.endpoint_name))

    # -- metrics ---------------------------------------------------------------------------------------------------
    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        """Per deployment from Azure Monitor (the endpoint's metrics split by the ``deployment`` dimension):
        ``RequestsPerMinute`` summed over one-minute grains since ``since`` (errors: ``statusCodeClass`` 5xx; a
        mirrored deployment counts the copies it answered), ``RequestLatency_P50`` (mean of the grains) and
        ``RequestLatency_P95`` (their maximum). Azure Monitor keeps these per minute and publishes them a minute
        or more late: on Azure ``since`` counts from its minute, and a bake shorter than that sees too few."""
        ep = self._endpoint(handle)
        deps = self._deployments(handle.endpoint_name)
        start = since if since is not None else time.time() - 3600
        end = max(time.time(), start) + 1
        timespan = f"{_iso(start)}/{_iso(end)}"
        requests: dict[str, list[tuple[str, float]]] = {}
        for series in self._metric(ep.id, _METRIC_REQUESTS, timespan, "deployment eq '*' and statusCodeClass eq '*'"):
            labels = _labels(series)
            for value in _values(series, "average"):
                requests.setdefault(labels.get("deployment", "").lower(), []).append(
                    (labels.get("statuscodeclass", ""), value)
                )
        latency: dict[str, dict[str, list[float]]] = {}
        for metric in (_METRIC_P50, _METRIC_P95):
            for series in self._metric(ep.id, metric, timespan, "deployment eq '*'"):
                label = _labels(series).get("deployment", "").lower()
                latency.setdefault(label, {}).setdefault(metric, []).extend(_values(series, "average"))
        rows = []
        for variant in variants:
            dep = deps.get(variant)
            if dep is None:
                rows.append(VariantMetrics(variant, 0, 0))
                continue
            points = requests.get(dep.name.lower(), [])
            calls = round(sum(v for _, v in points))
            errors = round(sum(v for cls, v in points if cls.lower().startswith("5")))
            lat = latency.get(dep.name.lower(), {})
            p50s, p95s = lat.get(_METRIC_P50, []), lat.get(_METRIC_P95, [])
            p50 = sum(p50s) / len(p50s) if p50s and calls else None
            p95 = max(p95s) if p95s and calls else None
            rows.append(VariantMetrics(variant, calls, errors, p50, p95, round(end - start, 1)))
        return rows

    def _metric(self, resource: str, name: str, timespan: str, query: str) -> list[Any]:
        found = self._call(
            f"reading the Azure Monitor metric {name} of {resource}",
            self.monitor().metrics.list,
            resource,
            timespan=timespan,
            interval="PT1M",
            metricnames=name,
            aggregation="Average",
            filter=query,
        )
        return [series for metric in found.value or [] for series in metric.timeseries or []]

    # -- endings ---------------------------------------------------------------------------------------------------
    def _delete(self, endpoint: str, deployment: str) -> None:
        self._unscale(endpoint, deployment)
        poller = self._call(
            f"deleting deployment {deployment} of endpoint {endpoint}",
            self.ml().online_deployments.begin_delete,
            name=deployment,
            endpoint_name=endpoint,
            missing_ok=True,
        )
        if poller is not None:
            self._wait(poller, f"deleting deployment {deployment} of {endpoint}")

    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        endpoint = handle.endpoint_name
        ep = self._endpoint(handle)
        deps = self._deployments(endpoint)
        keep = {v: float(previous.get(v, 0.0)) for v in deps if v in previous and v != failed_variant}
        if not keep:
            raise DeploymentError(
                f"endpoint {endpoint}: none of the previous versions {sorted(previous)} is deployed "
                f"(it has {sorted(deps)}); {failed_variant} left serving"
            )
        whole = R.whole_percents(keep)
        if failed_variant in deps:
            failed = deps[failed_variant].name
            split = {deps[v].name: whole.get(v, 0) for v in deps if v != failed_variant}
            mirror = {k: int(v) for k, v in (ep.mirror_traffic or {}).items() if k.lower() != failed.lower()}
            self._update_endpoint(ep, traffic=split, mirror=mirror, what=f"restoring {whole}")
            self._delete(endpoint, failed)

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        endpoint = handle.endpoint_name
        ep = self._endpoint(handle)
        deps = self._deployments(endpoint)
        if new_variant not in deps:
            if keep_new:
                raise DeploymentError(f"endpoint {endpoint} does not serve {new_variant}; cannot promote it")
            return
        new = deps[new_variant].name
        if keep_new:
            split = {dep.name: (100 if variant == new_variant else 0) for variant, dep in deps.items()}
            self._update_endpoint(ep, traffic=split, mirror={}, what=f"promoting {new_variant}")
            for variant, dep in deps.items():
                if variant != new_variant:
                    self._delete(endpoint, dep.name)
        else:  # a shadow: stop mirroring, remove it; the serving split stays
            mirror = {k: int(v) for k, v in (ep.mirror_traffic or {}).items() if k.lower() != new.lower()}
            split = {k: int(v) for k, v in (ep.traffic or {}).items() if k.lower() != new.lower()}
            self._update_endpoint(ep, traffic=split, mirror=mirror, what=f"removing the shadow {new_variant}")
            self._delete(endpoint, new)

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        ep = self._get_endpoint(handle.endpoint_name)
        if ep is None:
            return {"status": "missing", "weights": {}, "variants": []}
        deps = self._deployments(handle.endpoint_name)
        return {
            "resource": ep.id,
            "status": ep.provisioning_state,
            "scoring_uri": ep.scoring_uri,
            "weights": self._live(ep, deps),
            "mirror": {k: float(v) for k, v in (ep.mirror_traffic or {}).items() if v},
            "variants": [
                {
                    "name": variant,
                    "deployment": dep.name,
                    "instance_type": dep.instance_type,
                    "state": dep.provisioning_state,
                }
                for variant, dep in deps.items()
            ],
            "console_url": handle.console_url,
        }

    # -- the rollout record: an object under the output URI ---------------------------------------------------------
    def _record_uri(self, endpoint: str) -> str:
        self.settings.require("output_uri")
        return self.settings.path("endpoints", validate_endpoint_name(endpoint), "rollout.json")

    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None:
        return load_rollout_record(self._record_uri(endpoint_name))

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None:
        save_rollout_record(self._record_uri(endpoint_name), record)

    def stop_endpoint(self, endpoint_name: str) -> None:
        """Delete the endpoint with its deployments; the rollout record stays, as history."""
        endpoint = validate_endpoint_name(endpoint_name)
        if self._get_endpoint(endpoint) is None:
            return
        self._wait(
            self._call(f"deleting endpoint {endpoint}", self.ml().online_endpoints.begin_delete, name=endpoint),
            f"deleting endpoint {endpoint}",
        )


def _api_error(err: Exception, what: str) -> PlatformApiError:
    """A refused Azure call as :class:`PlatformRefusedError` (4xx other than 404, 409 and 429; authentication;
    the SDK's own validation of a user error) or :class:`PlatformApiError` (the rest: a retry may pass)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    status = getattr(err, "status_code", None)
    if isinstance(err, HttpResponseError) and status is not None:
        code = getattr(getattr(err, "error", None), "code", None)
        label = f"HTTP {status}" + (f" {code}" if code else "")
    else:
        label = type(err).__name__
    message = f"{what} failed: {label}: {_reason(err)}"
    user_error = "USER_ERROR" in str(getattr(err, "error_category", "")).upper()
    if (
        isinstance(err, ClientAuthenticationError)
        or (isinstance(status, int) and 400 <= status < 500 and status not in (404, 409, 429))
        or (status is None and user_error)
    ):
        return PlatformRefusedError(message)
    return PlatformApiError(message)


def _status(job: Any) -> str:
    """A job's status as the service names it (the SDK may hand back an enum)."""
    status = job.status
    return str(getattr(status, "value", status))


def _reason(err: Exception) -> str:
    """What the service said: the ARM error's message (not the SDK's formatted repeat of it)."""
    detail = getattr(err, "error", None)
    message = getattr(detail, "message", None) or getattr(err, "message", None) or str(err)
    return " ".join(str(message).split())[:1500]


def _labels(series: Any) -> dict[str, str]:
    return {str(m.name.value).lower(): str(m.value) for m in (series.metadatavalues or []) if m.name is not None}


def _values(series: Any, aggregation: str) -> list[float]:
    out = []
    for point in series.data or []:
        value = getattr(point, aggregation, None)
        if value is not None:
            out.append(float(value))
    return out

"""The Vertex AI adapter: custom jobs, models and endpoints through the v1 GAPIC clients, Cloud Monitoring metrics.

The clients are built here (not through the google provider's Vertex hooks, which fix the regional endpoint and
gRPC): credentials and project from the provider's ``GoogleBaseHook`` and a ``google_cloud_platform`` connection,
``api_endpoint`` / ``transport`` / ``monitoring_endpoint`` from the connection's extra or the settings.
Endpoints are found by the label ``llmops-endpoint``, jobs by display name and the label ``llmops-job``; versions
are deployed models whose display name is the variant. Vertex has no bake or rollback of its own: the rollout
(steps through ``traffic_split``, judged on Cloud Monitoring) is the guardrail.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

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
from airflow_llmops.platforms.vertex import requests as R
from airflow_llmops.platforms.vertex.requests import VertexConfigError, VertexSettings
from airflow_llmops.specs import RolloutPlan, TrainingSpec

METRIC = "aiplatform.googleapis.com/prediction/online/"
_STATES = {
    "JOB_STATE_QUEUED": JobState.PENDING,
    "JOB_STATE_PENDING": JobState.PENDING,
    "JOB_STATE_RUNNING": JobState.RUNNING,
    "JOB_STATE_CANCELLING": JobState.RUNNING,
    "JOB_STATE_UPDATING": JobState.RUNNING,
    "JOB_STATE_PAUSED": JobState.RUNNING,
    "JOB_STATE_SUCCEEDED": JobState.SUCCEEDED,
    "JOB_STATE_PARTIALLY_SUCCEEDED": JobState.FAILED,
    "JOB_STATE_FAILED": JobState.FAILED,
    "JOB_STATE_EXPIRED": JobState.FAILED,
    "JOB_STATE_CANCELLED": JobState.CANCELLED,
}


def _resource(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The resource a client call is about: its ``name``/``endpoint``/``parent`` argument (or the request's)."""
    candidates = [kwargs.get(k) for k in ("name", "endpoint", "parent", "model", "custom_job")]
    request = kwargs.get("request", args[0] if args else None)
    if isinstance(request, Mapping):
        candidates += [request.get(k) for k in ("name", "endpoint", "parent")]
    elif request is not None:
        candidates += [getattr(request, k, None) for k in ("name", "endpoint", "parent")]
    for value in candidates:
        name = value if isinstance(value, str) else getattr(value, "name", None)
        if isinstance(name, str) and name:
            return name
    return "(no resource named)"


class _Calls:
    """A GAPIC client whose failed calls raise :class:`PlatformRefusedError` (permission, bad argument: no retry)
    or :class:`PlatformApiError` (quota, unavailable: a retry may pass), naming the call and the resource."""

    def __init__(self, client: Any, project: str) -> None:
        self._client = client
        self._project = project

    def __getattr__(self, method: str) -> Any:
        attr = getattr(self._client, method)
        if not callable(attr) or method.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            from google.api_core import exceptions

            try:
                return attr(*args, **kwargs)
            except exceptions.GoogleAPICallError as err:
                # gRPC names the status; over REST the class says it (from the HTTP code): 4xx other than
                # throttling (429), a missing resource (404) and conflicts (409) is refused for good.
                status = getattr(err.grpc_status_code, "name", None) or f"HTTP {err.code} {type(err).__name__}"
                message = (
                    f"Vertex AI {method} on {_resource(args, kwargs)} (project {self._project}) failed: {status}: "
                    f"{err.message}"
                )
                retryable = (exceptions.TooManyRequests, exceptions.NotFound, exceptions.Conflict)
                if isinstance(err, exceptions.ClientError) and not isinstance(err, retryable):
                    raise PlatformRefusedError(message) from None
                raise PlatformApiError(message) from None

        return call


class Vertex:
    """``platform="vertex"``. Keyword arguments are :class:`VertexSettings` fields (JSON values)."""

    name = "vertex"
    # No mirrored traffic on Vertex endpoints; no guarded deployment of its own (our rollout is the guardrail).
    capabilities = PlatformCapabilities(
        traffic_split=True, shadow=False, native_guarded_deployment=False, autoscaling=True
    )

    def __init__(self, **settings: Any) -> None:
        self.settings = settings_from(VertexSettings, settings, platform="vertex", error=VertexConfigError)
        self._clients: dict[str, Any] = {}
        self._conn: tuple[Any, str, dict[str, Any]] | None = None

    # -- clients --------------------------------------------------------------------------------------------------
    def _connection(self) -> tuple[Any, str, dict[str, Any]]:
        if self._conn is None:
            from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
            from airflow.sdk import BaseHook

            conn_id = self.settings.gcp_conn_id or "google_cloud_default"
            hook = GoogleBaseHook(gcp_conn_id=conn_id)
            credentials, project = hook.get_credentials_and_project_id()
            extra = BaseHook.get_connection(conn_id).extra_dejson
            project = self.settings.project or project or extra.get("project")
            if not project:
                raise VertexConfigError(
                    f"no Google Cloud project: set the connection {conn_id!r}'s project or platform_options project"
                )
            self._conn = (credentials, str(project), dict(extra))
        return self._conn

    @property
    def project(self) -> str:
        return self._connection()[1]

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.settings.region}"

    def client(self, kind: str) -> Any:
        if kind not in self._clients:
            from google.api_core.client_options import ClientOptions

            credentials, _, extra = self._connection()
            if kind == "metric":
                from google.cloud import monitoring_v3

                endpoint = self.settings.monitoring_endpoint or extra.get("monitoring_endpoint")
                if endpoint and extra.get("monitoring_insecure"):
                    import grpc
                    from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport

                    transport = MetricServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
                    self._clients[kind] = monitoring_v3.MetricServiceClient(transport=transport)
                else:
                    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
                    self._clients[kind] = monitoring_v3.MetricServiceClient(
                        credentials=credentials, client_options=options
                    )
            else:
                from google.cloud import aiplatform_v1

                cls = {
                    "job": aiplatform_v1.JobServiceClient,
                    "model": aiplatform_v1.ModelServiceClient,
                    "endpoint": aiplatform_v1.EndpointServiceClient,
                    "prediction": aiplatform_v1.PredictionServiceClient,
                }[kind]
                api = (
                    self.settings.api_endpoint
                    or extra.get("api_endpoint")
                    or f"{self.settings.region}-aiplatform.googleapis.com"
                )
                transport = self.settings.transport or extra.get("transport") or "grpc"
                self._clients[kind] = cls(
                    credentials=credentials, client_options=ClientOptions(api_endpoint=api), transport=transport
                )
        return _Calls(self._clients[kind], self._connection()[1])

    def _console(self, fragment: str) -> str:
        return f"https://console.cloud.google.com/vertex-ai/{fragment}?project={self.project}"

    # == training ==============================================================================================
    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle:
        body = R.custom_job(spec, job_name=job_name, settings=self.settings)  # refuses bad input before any call
        from google.cloud import aiplatform_v1

        job = self._find_job(job_name)
        if job is None:
            job = self.client("job").create_custom_job(parent=self.parent, custom_job=aiplatform_v1.CustomJob(body))
        job_id = job.name.rsplit("/", 1)[-1]
        return JobHandle(
            platform=self.name,
            job_id=job.name,
            job_name=job_name,
            console_url=self._console(f"locations/{self.settings.region}/training/{job_id}/cpu"),
            extra={"output": body["job_spec"]["base_output_directory"]["output_uri_prefix"]},
        )

    def _find_job(self, job_name: str) -> Any | None:
        label = R.label_value(job_name)
        wanted = f'display_name="{job_name}" AND labels.{R.LABEL_JOB}="{label}"'
        for job in self.client("job").list_custom_jobs(request={"parent": self.parent, "filter": wanted}):
            return job
        return None

    def _job(self, handle: JobHandle) -> Any:
        return self.client("job").get_custom_job(name=handle.job_id)

    def _result(self, handle: JobHandle) -> dict[str, Any]:
        """What the runtime wrote at the end (metrics, MLflow run id; or the failure and the last log lines)."""
        return read_json_uri(f"{handle.extra.get('output', '')}/llmops/result.json")

    def get_training_status(self, handle: JobHandle) -> JobStatus:
        job = self._job(handle)
        state = _STATES.get(job.state.name, JobState.RUNNING)
        if state is JobState.SUCCEEDED:
            result = self._result(handle)
            metrics = {k: float(v) for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
            return JobStatus(state, "succeeded", metrics=metrics, model_uri=f"{handle.extra['output']}/model")
        if state is JobState.FAILED:
            result = self._result(handle)
            message = result.get("message") or job.error.message or job.state.name
            tail = result.get("log_tail") or []
            return JobStatus(state, str(message) + (("\nlast log lines:\n" + "\n".join(tail)) if tail else ""))
        return JobStatus(state, job.state.name)

    def cancel_training(self, handle: JobHandle) -> None:
        job = self._job(handle)
        if _STATES.get(job.state.name, JobState.RUNNING).is_terminal:
            return
        self.client("job").cancel_custom_job(name=handle.job_id)

    def describe_training(self, handle: JobHandle) -> dict[str, Any]:
        job = self._job(handle)
        state = _STATES.get(job.state.name, JobState.RUNNING)
        return {
            "status": {"state": state.value, **(self._result(handle) if state.is_terminal else {})},
            "vertex": {"name": job.name, "state": job.state.name, "error": job.error.message or None},
            "console_url": handle.console_url,
        }

    # == tuning ================================================================================================
    def _find_tuning(self, job_name: str) -> Any | None:
        label = R.label_value(job_name)
        wanted = f'display_name="{job_name}" AND labels.{R.LABEL_JOB}="{label}"'
        request = {"parent": self.parent, "filter": wanted}
        for job in self.client("job").list_hyperparameter_tuning_jobs(request=request):
            return job
        return None

    def _tuning(self, job_name: str) -> Any | None:
        found = self._find_tuning(job_name)
        return None if found is None else self.client("job").get_hyperparameter_tuning_job(name=found.name)

    def submit_tuning(self, tuning: Any, *, job_name: str) -> dict[str, Any]:
        """Start (or find, on a retry) the hyperparameter tuning job for a
        :class:`~airflow_llmops.specs.tuning.TuningSpec` (see :func:`requests.tuning_job`)."""
        body = R.tuning_job(tuning, job_name=job_name, settings=self.settings)  # refuses bad input before any call
        from google.cloud import aiplatform_v1

        job = self._find_tuning(job_name)
        if job is None:
            job = self.client("job").create_hyperparameter_tuning_job(
                parent=self.parent, hyperparameter_tuning_job=aiplatform_v1.HyperparameterTuningJob(body)
            )
        job_id = job.name.rsplit("/", 1)[-1]
        return {
            "job_name": job_name,
            "resource": job.name,
            "console_url": self._console(f"locations/{self.settings.region}/training/{job_id}/cpu"),
        }

    @staticmethod
    def _trial(job: Any, trial: Any) -> dict[str, Any]:
        metrics = {m.metric_id: float(m.value) for m in trial.final_measurement.metrics}
        goal = job.study_spec.metrics[0]
        base = job.trial_job_spec.base_output_directory.output_uri_prefix.rstrip("/")
        return {
            "trial": trial.id,
            "training_job": trial.custom_job or None,
            "status": trial.state.name,
            "params": {p.parameter_id: p.value for p in trial.parameters},
            "value": metrics.get(goal.metric_id),
            "model_uri": f"{base}/{trial.id}/model" if base else None,
            "infeasible_reason": trial.infeasible_reason or None,
        }

    def tuning_status(self, job_name: str) -> dict[str, Any]:
        """``state`` (a JobState value), ``message``, the trials by state and the best trial so far."""
        job = self._tuning(job_name)
        if job is None:
            return {"state": JobState.FAILED.value, "message": f"tuning job {job_name} does not exist"}
        state = _STATES.get(job.state.name, JobState.RUNNING)
        trials = [self._trial(job, t) for t in job.trials]
        counters: dict[str, int] = {}
        for trial in trials:
            counters[trial["status"]] = counters.get(trial["status"], 0) + 1
        scored = [t for t in trials if t["status"] == "SUCCEEDED" and t["value"] is not None]
        maximize = job.study_spec.metrics[0].goal.name == "MAXIMIZE"
        best = (max if maximize else min)(scored, key=lambda t: t["value"]) if scored else None
        return {
            "state": state.value,
            "message": job.error.message or job.state.name,
            "counters": counters,
            "best": best,
        }

    def tuning_trials(self, job_name: str) -> list[dict[str, Any]]:
        job = self._tuning(job_name)
        return [] if job is None else [self._trial(job, t) for t in job.trials]

    def stop_tuning(self, job_name: str) -> None:
        job = self._find_tuning(job_name)
        if job is None or _STATES.get(job.state.name, JobState.RUNNING).is_terminal:
            return
        self.client("job").cancel_hyperparameter_tuning_job(name=job.name)

    # == deployment ============================================================================================
    def _find_endpoint(self, endpoint: str) -> Any | None:
        wanted = f'labels.{R.LABEL_ENDPOINT}="{R.label_value(endpoint)}"'
        for found in self.client("endpoint").list_endpoints(request={"parent": self.parent, "filter": wanted}):
            return self.client("endpoint").get_endpoint(name=found.name)
        return None

    def _endpoint(self, handle: EndpointHandle) -> Any:
        found = self._find_endpoint(handle.endpoint_name)
        if found is None:
            raise DeploymentError(f"endpoint {handle.endpoint_name} does not exist on Vertex AI ({self.parent})")
        return found

    @staticmethod
    def _ids(ep: Any) -> dict[str, str]:
        """Variant (deployed model display name) -> deployed model id."""
        return {d.display_name: d.id for d in ep.deployed_models}

    def _wait(self, operation: Any, what: str) -> Any:
        try:
            return operation.result(timeout=self.settings.wait_timeout_s)
        except Exception as err:
            raise DeploymentError(f"Vertex AI could not finish {what}: {err}") from err

    def _handle(self, endpoint: str, ep: Any, **extra: Any) -> EndpointHandle:
        eid = ep.name.rsplit("/", 1)[-1]
        return EndpointHandle(
            platform=self.name,
            endpoint_name=endpoint,
            url=f"https://{self.settings.region}-aiplatform.googleapis.com/v1/{ep.name}:predict",
            console_url=self._console(f"locations/{self.settings.region}/endpoints/{eid}"),
            extra={"resource": ep.name, **extra},
        )

    def _upload(self, endpoint: str, variant: str, model_uri: str) -> str:
        from google.cloud import aiplatform_v1

        body = R.model_upload(endpoint, variant, model_uri, settings=self.settings)
        wanted = " AND ".join(f'labels.{k}="{v}"' for k, v in body["labels"].items() if k.startswith("llmops-"))
        for model in self.client("model").list_models(request={"parent": self.parent, "filter": wanted}):
            return str(model.name)
        operation = self.client("model").upload_model(parent=self.parent, model=aiplatform_v1.Model(body))
        return str(self._wait(operation, f"uploading {variant}").model)

    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        from google.cloud import aiplatform_v1

        endpoint = validate_endpoint_name(endpoint_name)
        self.settings.require("staging_uri", "image_uri")
        resources = R.dedicated_resources(plan, self.settings)
        R.logging_config(self.settings)  # refused before any call
        ep = self._find_endpoint(endpoint)
        if ep is None:
            body = aiplatform_v1.Endpoint(display_name=endpoint, labels=R.labels(self.settings, endpoint=endpoint))
            logging = R.logging_config(self.settings)
            if logging is not None:  # requests and responses to BigQuery, for drift from Vertex's own log
                body.predict_request_response_logging_config = aiplatform_v1.PredictRequestResponseLoggingConfig(
                    logging
                )
            ep = self._wait(self.client("endpoint").create_endpoint(parent=self.parent, endpoint=body), "creating it")
        ids = self._ids(ep)
        previous = {v: float(ep.traffic_split.get(i, 0)) for v, i in ids.items() if v != variant}
        if variant in ids:  # deployed already (a retry)
            return self._handle(endpoint, ep, previous=previous, plan=plan.to_dict())
        model = self._upload(endpoint, variant, model_uri)
        split = {i: int(ep.traffic_split.get(i, 0)) for i in ids.values()}
        split["0"] = 0 if ids else 100  # "0": the model being deployed; the first one takes everything
        deployed = aiplatform_v1.DeployedModel(
            model=model, display_name=variant, dedicated_resources=aiplatform_v1.DedicatedResources(resources)
        )
        self._wait(
            self.client("endpoint").deploy_model(endpoint=ep.name, deployed_model=deployed, traffic_split=split),
            f"deploying {variant}",
        )
        return self._handle(endpoint, self._endpoint_by_name(ep.name), previous=previous, plan=plan.to_dict())

    def _endpoint_by_name(self, name: str) -> Any:
        return self.client("endpoint").get_endpoint(name=name)

    def _set_split(self, ep: Any, split: Mapping[str, int]) -> None:
        from google.cloud import aiplatform_v1
        from google.protobuf import field_mask_pb2

        body = aiplatform_v1.Endpoint(name=ep.name, traffic_split=dict(split))
        self.client("endpoint").update_endpoint(
            endpoint=body, update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"])
        )

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        weights = validate_weights(weights)
        ep = self._endpoint(handle)
        ids = self._ids(ep)
        unknown = sorted(set(weights) - set(ids))
        if unknown:
            raise DeploymentError(
                f"endpoint {handle.endpoint_name} has no deployed models {unknown}; it has {sorted(ids)}"
            )
        whole = R.integer_split({v: float(weights.get(v, 0.0)) for v in ids})
        self._set_split(ep, {ids[v]: p for v, p in whole.items()})

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]:
        ep = self._endpoint(handle)
        return {v: float(ep.traffic_split.get(i, 0)) for v, i in self._ids(ep).items()}

    # -- metrics ---------------------------------------------------------------------------------------------------
    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        """Per deployed model from Cloud Monitoring: ``prediction_count`` (all), ``error_count`` and the
        ``prediction_latencies`` distribution (p50/p95 from its buckets) since ``since``."""
        from google.cloud import monitoring_v3

        ep = self._endpoint(handle)
        ids = self._ids(ep)
        eid = ep.name.rsplit("/", 1)[-1]
        start = since if since is not None else time.time() - 3600
        end = max(time.time(), start) + 1  # Monitoring refuses an interval that ends before it starts
        interval = monitoring_v3.TimeInterval(
            {"start_time": {"seconds": int(start), "nanos": int((start % 1) * 1e9)}, "end_time": {"seconds": int(end)}}
        )
        rows = []
        for variant in variants:
            dmid = ids.get(variant)
            if dmid is None:
                rows.append(VariantMetrics(variant, 0, 0))
                continue
            series = {
                kind: self._series(f"{METRIC}{kind}", eid, dmid, interval)
                for kind in ("prediction_count", "error_count", "prediction_latencies")
            }
            calls = int(sum(_value(p) for s in series["prediction_count"] for p in s.points))
            errors = int(sum(_value(p) for s in series["error_count"] for p in s.points))
            p50, p95 = _percentiles(
                [p.value.distribution_value for s in series["prediction_latencies"] for p in s.points]
            )
            rows.append(VariantMetrics(variant, calls, errors, p50, p95, round(end - start, 1)))
        return rows

    def _series(self, metric: str, endpoint_id: str, deployed_model_id: str, interval: Any) -> list[Any]:
        from google.cloud import monitoring_v3

        query = (
            f'metric.type = "{metric}" AND resource.labels.endpoint_id = "{endpoint_id}" '
            f'AND metric.labels.deployed_model_id = "{deployed_model_id}"'
        )
        request = monitoring_v3.ListTimeSeriesRequest(
            name=f"projects/{self.project}",
            filter=query,
            interval=interval,
            view=monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
        )
        return list(self.client("metric").list_time_series(request=request))

    # -- endings ---------------------------------------------------------------------------------------------------
    def _undeploy(self, ep: Any, variant: str, split: Mapping[str, int]) -> None:
        ids = self._ids(ep)
        if variant not in ids:
            return
        model = next(d.model for d in ep.deployed_models if d.display_name == variant)
        self._wait(
            self.client("endpoint").undeploy_model(
                endpoint=ep.name, deployed_model_id=ids[variant], traffic_split=dict(split)
            ),
            f"undeploying {variant}",
        )
        with contextlib.suppress(DeploymentError):  # still used elsewhere (another endpoint): keep it
            self._wait(self.client("model").delete_model(name=model), f"deleting the model of {variant}")

    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        ep = self._endpoint(handle)
        ids = self._ids(ep)
        keep = {v: float(previous.get(v, 0.0)) for v in ids if v in previous}
        if not keep:
            raise DeploymentError(
                f"endpoint {handle.endpoint_name}: none of the previous versions {sorted(previous)} is deployed "
                f"(it has {sorted(ids)}); {failed_variant} left serving"
            )
        whole = R.integer_split(keep)
        if failed_variant in ids:
            self._set_split(ep, {**{ids[v]: p for v, p in whole.items()}, ids[failed_variant]: 0})
            ep = self._endpoint(handle)
            self._undeploy(ep, failed_variant, {ids[v]: p for v, p in whole.items()})

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        if not keep_new:
            raise DeploymentError("Vertex AI endpoints cannot mirror traffic; there is no shadow to remove")
        ep = self._endpoint(handle)
        ids = self._ids(ep)
        if new_variant not in ids:
            raise DeploymentError(f"endpoint {handle.endpoint_name} does not serve {new_variant}; cannot promote it")
        self._set_split(ep, {i: (100 if v == new_variant else 0) for v, i in ids.items()})
        for old in [v for v in ids if v != new_variant]:
            self._undeploy(self._endpoint(handle), old, {ids[new_variant]: 100})

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        ep = self._find_endpoint(handle.endpoint_name)
        if ep is None:
            return {"status": "missing", "weights": {}, "variants": []}
        ids = self._ids(ep)
        return {
            "resource": ep.name,
            "weights": {v: float(ep.traffic_split.get(i, 0)) for v, i in ids.items()},
            "variants": [
                {"name": d.display_name, "deployed_model_id": d.id, "model": d.model} for d in ep.deployed_models
            ],
            "console_url": handle.console_url,
        }

    # -- the rollout record: an object under the staging URI -----------------------------------------------------
    def _record_uri(self, endpoint: str) -> str:
        self.settings.require("staging_uri")
        return self.settings.path("endpoints", validate_endpoint_name(endpoint), "rollout.json")

    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None:
        return load_rollout_record(self._record_uri(endpoint_name))

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None:
        save_rollout_record(self._record_uri(endpoint_name), record)

    def stop_endpoint(self, endpoint_name: str) -> None:
        """Undeploy every model (and delete it), then delete the endpoint; the rollout record stays, as history."""
        ep = self._find_endpoint(validate_endpoint_name(endpoint_name))
        if ep is None:
            return
        for variant in list(self._ids(ep)):
            ep = self._endpoint_by_name(ep.name)
            rest = {i: 0 for v, i in self._ids(ep).items() if v != variant}
            if rest:
                first = next(iter(rest))
                rest[first] = 100
            self._undeploy(ep, variant, rest)
        self._wait(self.client("endpoint").delete_endpoint(name=ep.name), f"deleting {endpoint_name}")


def _value(point: Any) -> float:
    value = point.value
    return float(value.int64_value or value.double_value or 0)


def _percentiles(distributions: list[Any]) -> tuple[float | None, float | None]:
    """p50 and p95 (ms) of several latency distributions: from their buckets where they have bounds, else the
    means (p50: the overall mean; p95: the largest mean, a lower estimate)."""
    counts: dict[float, int] = {}
    total = 0
    means: list[tuple[float, int]] = []
    for dist in distributions:
        if not dist.count:
            continue
        means.append((float(dist.mean), int(dist.count)))
        bounds = list(dist.bucket_options.explicit_buckets.bounds)
        if not bounds or not dist.bucket_counts:
            continue
        for i, n in enumerate(dist.bucket_counts):
            upper = bounds[i] if i < len(bounds) else float("inf")
            counts[upper] = counts.get(upper, 0) + int(n)
            total += int(n)
    if total:
        out = []
        for q in (0.5, 0.95):
            seen = 0
            for upper in sorted(counts):
                seen += counts[upper]
                if seen >= q * total:
                    out.append(upper if upper != float("inf") else max(m for m, _ in means))
                    break
        return out[0], out[1]
    if not means:
        return None, None
    weight = sum(n for _, n in means)
    return sum(m * n for m, n in means) / weight, max(m for m, _ in means)

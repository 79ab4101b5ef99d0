"""The SageMaker adapter: both halves of the platform protocol on one AWS account and region.

Training: ``CreateTrainingJob`` named by :func:`~airflow_llmops.platforms.base.job_name_for` (a retry finds its job
by name), the runtime image's ``train`` entry point running torchrun across the instances, managed spot with S3
checkpoints. Deployment: a SageMaker Model and an endpoint config per version; traffic through production variant
weights; metrics from CloudWatch; the rollout record as an S3 object next to the endpoint's Data Capture; with
``native_guardrails`` SageMaker's blue/green update with alarm rollback, watched until it ends.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from airflow_llmops.platforms.base import (
    DeploymentError,
    EndpointHandle,
    JobHandle,
    JobState,
    JobStatus,
    PlatformCapabilities,
    RolloutRecord,
    VariantMetrics,
    settings_from,
    validate_endpoint_name,
    validate_weights,
)
from airflow_llmops.platforms.sagemaker import requests as R
from airflow_llmops.platforms.sagemaker.requests import SageMakerConfigError, SageMakerSettings, Variant
from airflow_llmops.specs import RolloutPlan, TrainingSpec

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
RESULT_PREFIX = "[llmops-result] "  # printed by airflow_llmops.ml.train on success
_PENDING = {"Starting", "Pending", "Downloading", "LaunchingMLInstances", "PreparingTrainingStack"}
_BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack", "UpdateRollbackFailed"}


def _missing(err: Exception) -> bool:
    """A ClientError that says the resource does not exist (SageMaker answers ValidationException for that)."""
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    message = str(err).lower()
    if code in ("ResourceNotFound", "ResourceNotFoundException", "NoSuchKey", "404"):
        return True
    return code == "ValidationException" and any(
        words in message for words in ("not found", "could not find", "does not exist")
    )


class SageMaker:
    """``platform="sagemaker"``. Keyword arguments are :class:`SageMakerSettings` fields (JSON values)."""

    name = "sagemaker"
    capabilities = PlatformCapabilities(
        traffic_split=True, shadow=True, native_guarded_deployment=True, autoscaling=True
    )

    def __init__(self, **settings: Any) -> None:
        self.settings = settings_from(SageMakerSettings, settings, platform="sagemaker", error=SageMakerConfigError)
        self._clients: dict[str, Any] = {}
        self._region: str | None = self.settings.region_name

    # -- AWS clients -------------------------------------------------------------------------------------------
    def client(self, service: str) -> Any:
        if service not in self._clients:
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
            from botocore.config import Config

            hook = AwsBaseHook(
                aws_conn_id=self.settings.aws_conn_id,
                client_type=service,
                region_name=self.settings.region_name,
                # Throttling and transient errors: botocore's standard mode (backoff with jitter), not a loop of ours.
                config=Config(retries={"mode": "standard", "max_attempts": self.settings.max_attempts}),
            )
            client = hook.get_client_type(region_name=self.settings.region_name)
            self._region = self._region or client.meta.region_name
            self._clients[service] = client
        return self._clients[service]

    @property
    def region(self) -> str:
        if self._region is None:
            self.client("sagemaker")
        return self._region or "us-east-1"

    def _console(self, fragment: str) -> str:
        return f"https://{self.region}.console.aws.amazon.com/sagemaker/home?region={self.region}#/{fragment}"

    # == training ==============================================================================================
    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle:
        request = R.training_job_request(spec, job_name=job_name, settings=self.settings)  # refuses bad input first
        sm = self.client("sagemaker")
        existing = self._describe_job(job_name)
        if existing is None:
            try:
                sm.create_training_job(**request)
            except Exception as err:
                if "ResourceInUse" not in str(err) and "already exists" not in str(err):
                    raise
            existing = self._describe_job(job_name) or {}
        return JobHandle(
            platform=self.name,
            job_id=str(existing.get("TrainingJobArn") or job_name),
            job_name=job_name,
            console_url=self._console(f"jobs/{job_name}"),
            extra={"region": self.region, "checkpoints": request["CheckpointConfig"]["S3Uri"]},
        )

    def _describe_job(self, job_name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client("sagemaker").describe_training_job(TrainingJobName=job_name))
        except Exception as err:
            if _missing(err):
                return None
            raise

    def get_training_status(self, handle: JobHandle) -> JobStatus:
        job = self._describe_job(handle.job_name)
        if job is None:
            return JobStatus(JobState.FAILED, f"training job {handle.job_name} does not exist on SageMaker")
        status, secondary = job.get("TrainingJobStatus"), job.get("SecondaryStatus", "")
        transitions = job.get("SecondaryStatusTransitions") or []
        detail = (transitions[-1].get("StatusMessage") or "") if transitions else ""
        if status == "InProgress":
            state = JobState.PENDING if secondary in _PENDING else JobState.RUNNING
            return JobStatus(state, f"{secondary}: {detail}".strip(": "))
        if status == "Stopping":
            return JobStatus(JobState.RUNNING, f"Stopping: {detail}".strip(": "))
        if status == "Completed":
            result = self._result(handle.job_name)
            metrics = {m["MetricName"]: float(m["Value"]) for m in job.get("FinalMetricDataList") or []}
            metrics.update({k: float(v) for k, v in (result.get("metrics") or {}).items() if _number(v)})
            return JobStatus(
                JobState.SUCCEEDED,
                f"Completed ({job.get('BillableTimeInSeconds', '?')} s billed)",
                metrics=metrics,
                model_uri=(job.get("ModelArtifacts") or {}).get("S3ModelArtifacts"),
            )
        reason = job.get("FailureReason") or secondary or str(status)
        if status == "Stopped" and secondary not in ("MaxRuntimeExceeded", "MaxWaitTimeExceeded"):
            return JobStatus(JobState.CANCELLED, f"Stopped: {detail or 'StopTrainingJob'}")
        tail = self.log_tail(handle.job_name, lines=15)
        message = f"{reason}" + (("\nlast log lines:\n" + "\n".join(tail)) if tail else "")
        return JobStatus(JobState.FAILED, message)

    def cancel_training(self, handle: JobHandle) -> None:
        job = self._describe_job(handle.job_name)
        if job is None or job.get("TrainingJobStatus") != "InProgress":
            return
        try:
            self.client("sagemaker").stop_training_job(TrainingJobName=handle.job_name)
        except Exception as err:  # it ended between the describe and the stop
            if "ValidationException" not in str(err):
                raise

    def describe_training(self, handle: JobHandle) -> dict[str, Any]:
        job = self._describe_job(handle.job_name) or {}
        state = self.get_training_status(handle).state.value if job else "missing"
        result = self._result(handle.job_name) if job.get("TrainingJobStatus") == "Completed" else {}
        keep = (
            "TrainingJobStatus",
            "SecondaryStatus",
            "FailureReason",
            "ModelArtifacts",
            "ResourceConfig",
            "EnableManagedSpotTraining",
            "CheckpointConfig",
            "TrainingTimeInSeconds",
            "BillableTimeInSeconds",
        )
        return {
            "status": {"state": state, **result},
            "sagemaker": json.loads(json.dumps({k: job.get(k) for k in keep if k in job}, default=str)),
            "console_url": handle.console_url,
            "log_tail": self.log_tail(handle.job_name, lines=20) if job else [],
        }

    def _streams(self, job_name: str) -> list[str]:
        logs = self.client("logs")
        try:
            found = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job_name}/")
        except Exception as err:
            if "ResourceNotFound" in str(err):
                return []
            raise
        return sorted(s["logStreamName"] for s in found.get("logStreams", []))

    def log_tail(self, job_name: str, *, lines: int = 20) -> list[str]:
        """The last ``lines`` log lines of every instance of the job (``[algo-1] ...``)."""
        logs = self.client("logs")
        out: list[str] = []
        for stream in self._streams(job_name):
            events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=False, limit=lines)
            host = stream.split("/", 1)[-1].rsplit("-", 1)[0]
            out += [f"[{host}] {e['message'].rstrip()}" for e in events.get("events", [])]
        return out[-lines * max(1, len(self._streams(job_name))) :] if out else []

    def _result(self, job_name: str) -> dict[str, Any]:
        """The training entry point's result line (metrics, MLflow run id) from the job's log."""
        logs = self.client("logs")
        for stream in self._streams(job_name):
            events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=False, limit=200)
            for event in reversed(events.get("events", [])):
                message = str(event.get("message", ""))
                if RESULT_PREFIX in message:
                    try:
                        return dict(json.loads(message.split(RESULT_PREFIX, 1)[1]))
                    except ValueError:
                        continue
        return {}

    # == hyperparameter tuning =================================================================================
    def submit_tuning(self, tuning: Any, *, job_name: str) -> dict[str, Any]:
        """Start (or find, on a retry) the tuning job for a :class:`~airflow_llmops.specs.tuning.TuningSpec`."""
        request = R.tuning_job_request(tuning, job_name=job_name, settings=self.settings)
        sm = self.client("sagemaker")
        if self._describe_tuning(job_name) is None:
            try:
                sm.create_hyper_parameter_tuning_job(**request)
            except Exception as err:
                if "ResourceInUse" not in str(err) and "already exists" not in str(err):
                    raise
        return {"job_name": job_name, "console_url": self._console(f"hyper-tuning-jobs/{job_name}")}

    def _describe_tuning(self, job_name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.client("sagemaker").describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=job_name)
            )
        except Exception as err:
            if _missing(err):
                return None
            raise

    def tuning_status(self, job_name: str) -> dict[str, Any]:
        """``state`` (a JobState value), ``message``, the trial counters and the best trial so far."""
        job = self._describe_tuning(job_name)
        if job is None:
            return {"state": JobState.FAILED.value, "message": f"tuning job {job_name} does not exist"}
        status = job.get("HyperParameterTuningJobStatus")
        state = {
            "Completed": JobState.SUCCEEDED,
            "Failed": JobState.FAILED,
            "Stopped": JobState.CANCELLED,
        }.get(str(status), JobState.RUNNING)
        best = job.get("BestTrainingJob") or {}
        objective = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        return {
            "state": state.value,
            "message": str(job.get("FailureReason") or status),
            "counters": job.get("TrainingJobStatusCounters") or {},
            "objectives": job.get("ObjectiveStatusCounters") or {},
            "best": {
                "training_job": best.get("TrainingJobName"),
                "params": dict(best.get("TunedHyperParameters") or {}),
                "value": objective.get("Value"),
            }
            if best
            else None,
        }

    def tuning_trials(self, job_name: str) -> list[dict[str, Any]]:
        sm = self.client("sagemaker")
        found = sm.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=job_name, MaxResults=100
        )
        trials = []
        for item in found.get("TrainingJobSummaries", []):
            metric = item.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
            trials.append(
                {
                    "training_job": item.get("TrainingJobName"),
                    "status": item.get("TrainingJobStatus"),
                    "params": dict(item.get("TunedHyperParameters") or {}),
                    "value": metric.get("Value"),
                }
            )
        return trials

    def stop_tuning(self, job_name: str) -> None:
        job = self._describe_tuning(job_name)
        if job is None or job.get("HyperParameterTuningJobStatus") != "InProgress":
            return
        self.client("sagemaker").stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=job_name)

    # == deployment ============================================================================================
    def _describe_endpoint(self, endpoint: str) -> dict[str, Any] | None:
        try:
            return dict(self.client("sagemaker").describe_endpoint(EndpointName=endpoint))
        except Exception as err:
            if _missing(err):
                return None
            raise

    def _wait(self, endpoint: str, *, what: str) -> dict[str, Any]:
        """Until the endpoint is ``InService``; a ``Failed`` endpoint or the time limit is a DeploymentError."""
        deadline = time.monotonic() + self.settings.wait_timeout_s
        pause = min(1.0, self.settings.poll_s)
        while True:
            ep = self._describe_endpoint(endpoint)
            if ep is None:
                raise DeploymentError(f"endpoint {endpoint} disappeared while {what}")
            status = ep.get("EndpointStatus")
            if status == "InService":
                return ep
            if status in ("Failed", "OutOfService"):
                raise DeploymentError(f"endpoint {endpoint} is {status} while {what}: {ep.get('FailureReason', '')}")
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"endpoint {endpoint} still {status} after {self.settings.wait_timeout_s:g}s while {what}"
                )
            time.sleep(pause)  # quick changes (weights) are seen at once, slow ones (a new fleet) polled gently
            pause = min(self.settings.poll_s, pause * 1.5)

    def _variants(self, ep: Mapping[str, Any]) -> list[Variant]:
        """The endpoint's variants: models and fleets from its config, weights as they are now."""
        config = self.client("sagemaker").describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])
        live = {v["VariantName"]: v for v in ep.get("ProductionVariants") or []}
        out = []
        for shadow, key in ((False, "ProductionVariants"), (True, "ShadowProductionVariants")):
            for v in config.get(key) or []:
                now = live.get(v["VariantName"], {})
                weight = now.get("CurrentWeight", now.get("DesiredWeight", v.get("InitialVariantWeight", 1.0)))
                out.append(
                    Variant(
                        name=v["VariantName"],
                        model=v["ModelName"],
                        weight=float(weight if weight is not None else 1.0),
                        instance_type=v.get("InstanceType", self.settings.serving_instance_type),
                        instance_count=int(v.get("InitialInstanceCount", 1)),
                        shadow=shadow,
                    )
                )
        return out

    def _ensure_model(self, endpoint: str, variant: str, model_uri: str) -> str:
        request = R.model_request(endpoint, variant, model_uri, settings=self.settings)
        sm = self.client("sagemaker")
        try:
            sm.describe_model(ModelName=request["ModelName"])
        except Exception as err:
            if not _missing(err):
                raise
            sm.create_model(**request)
        return str(request["ModelName"])

    def _ensure_config(self, endpoint: str, variants: list[Variant]) -> str:
        request = R.endpoint_config_request(endpoint, variants, settings=self.settings)
        sm = self.client("sagemaker")
        try:
            sm.describe_endpoint_config(EndpointConfigName=request["EndpointConfigName"])
        except Exception as err:
            if not _missing(err):
                raise
            sm.create_endpoint_config(**request)
        return str(request["EndpointConfigName"])

    def _switch(self, endpoint: str, variants: list[Variant], *, what: str) -> dict[str, Any]:
        """Point the endpoint at a config holding exactly ``variants`` and wait until it serves them."""
        config = self._ensure_config(endpoint, variants)
        ep = self._describe_endpoint(endpoint) or {}
        if ep.get("EndpointConfigName") != config:
            self.client("sagemaker").update_endpoint(EndpointName=endpoint, EndpointConfigName=config)
        return self._wait(endpoint, what=what)

    def _handle(self, endpoint: str, **extra: Any) -> EndpointHandle:
        return EndpointHandle(
            platform=self.name,
            endpoint_name=endpoint,
            url=f"https://runtime.sagemaker.{self.region}.amazonaws.com/endpoints/{endpoint}/invocations",
            console_url=self._console(f"endpoints/{endpoint}"),
            extra={"region": self.region, **extra},
        )

    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        endpoint = validate_endpoint_name(endpoint_name)
        R.check_name(variant, "variant")
        self.settings.require("role_arn", "image_uri", "s3_prefix")
        R.check_instance_type(self.settings.serving_instance_type, serving=True)
        if plan.native_guardrails:
            R.guarded_policy(plan)  # refuse a plan SageMaker cannot walk before creating anything
        model = self._ensure_model(endpoint, variant, model_uri)
        fleet: dict[str, Any] = {
            "instance_type": self.settings.serving_instance_type,
            "instance_count": self.settings.serving_instance_count,
        }
        plan_extra = {"plan": plan.to_dict()}
        ep = self._describe_endpoint(endpoint)
        if ep is None:
            config = self._ensure_config(endpoint, [Variant(variant, model, 100.0, **fleet)])
            self.client("sagemaker").create_endpoint(
                EndpointName=endpoint, EndpointConfigName=config, Tags=R.tags(self.settings, endpoint=endpoint)
            )
            self._wait(endpoint, what=f"creating it with {variant}")
            self._autoscale(endpoint, variant, plan)
            return self._handle(endpoint, previous={}, **plan_extra)
        if ep.get("EndpointStatus") != "InService":
            ep = self._wait(endpoint, what="waiting for an earlier change to finish")
        current = self._variants(ep)
        production = [v for v in current if not v.shadow]
        previous = R.percent({v.name: v.weight for v in production if v.name != variant})
        if any(v.name == variant for v in current):  # deployed already (a retry): nothing to change
            same = {"pending_config": ep["EndpointConfigName"]} if plan.native_guardrails else {}
            return self._handle(endpoint, previous=previous, **plan_extra, **same)
        new = Variant(variant, model, 0.0, **fleet)
        if plan.native_guardrails:
            # The whole new fleet in one config; SageMaker shifts traffic to it when the rollout starts.
            pending = self._ensure_config(endpoint, [replace(new, weight=100.0)])
            return self._handle(endpoint, previous=previous, pending_config=pending, **plan_extra)
        if plan.strategy == "shadow":
            if len(production) != 1:
                raise DeploymentError(
                    f"endpoint {endpoint} serves {len(production)} production variants; SageMaker shadows one: finish "
                    "the running split first"
                )
            weight = production[0].weight * plan.shadow_percent / 100.0
            variants = [*production, replace(new, weight=weight, shadow=True)]
        else:
            variants = [*production, new]
        self._switch(endpoint, variants, what=f"adding {variant} at 0 %")
        return self._handle(endpoint, previous=previous, **plan_extra)

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        weights = validate_weights(weights)
        endpoint = handle.endpoint_name
        ep = self._wait(endpoint, what="waiting to set traffic")
        production = [v.name for v in self._variants(ep) if not v.shadow]
        unknown = sorted(set(weights) - set(production))
        if unknown:
            raise DeploymentError(f"endpoint {endpoint} has no production variants {unknown}; it has {production}")
        desired = [{"VariantName": name, "DesiredWeight": float(weights.get(name, 0.0))} for name in production]
        self.client("sagemaker").update_endpoint_weights_and_capacities(
            EndpointName=endpoint, DesiredWeightsAndCapacities=desired
        )
        self._wait(endpoint, what=f"setting traffic {weights}")

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]:
        ep = self._describe_endpoint(handle.endpoint_name)
        if ep is None:
            raise DeploymentError(f"endpoint {handle.endpoint_name} does not exist")
        return R.percent({v.name: v.weight for v in self._variants(ep) if not v.shadow})

    # -- metrics -----------------------------------------------------------------------------------------------
    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        """Per variant from CloudWatch: ``Invocations`` and ``Invocation5XXErrors`` summed since ``since`` (CloudWatch
        keeps SageMaker's numbers per minute, so ``since`` counts from its minute), p50/p95 of ``ModelLatency``
        (percentiles where CloudWatch gives them, else the average and the maximum: an upper bound of the p95)."""
        cw = self.client("cloudwatch")
        end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)
        start = dt.datetime.fromtimestamp(since if since is not None else time.time() - 3600, dt.timezone.utc)
        queries = []
        for i, variant in enumerate(variants):
            for metric, stat, key in (
                ("Invocations", "Sum", "calls"),
                ("Invocation5XXErrors", "Sum", "errors"),
                ("ModelLatency", "Average", "avg"),
                ("ModelLatency", "Maximum", "max"),
            ):
                queries.append(
                    {
                        "Id": f"{key}{i}",
                        "MetricStat": {
                            "Metric": {
                                "Namespace": R.NAMESPACE,
                                "MetricName": metric,
                                "Dimensions": self._dims(handle.endpoint_name, variant),
                            },
                            "Period": 60,
                            "Stat": stat,
                        },
                        "ReturnData": True,
                    }
                )
        values: dict[str, list[float]] = {}
        token = None
        while True:
            kwargs: dict[str, Any] = {"MetricDataQueries": queries, "StartTime": start, "EndTime": end}
            if token:
                kwargs["NextToken"] = token
            page = cw.get_metric_data(**kwargs)
            for result in page.get("MetricDataResults", []):
                values.setdefault(result["Id"], []).extend(float(v) for v in result.get("Values", []))
            token = page.get("NextToken")
            if not token:
                break
        rows = []
        window = max(0.0, time.time() - start.timestamp())
        for i, variant in enumerate(variants):
            calls = round(sum(values.get(f"calls{i}", [])))
            errors = round(sum(values.get(f"errors{i}", [])))
            p50 = p95 = None
            if calls:
                p50, p95 = self._percentiles(handle.endpoint_name, variant, start, end)
                if p95 is None:
                    maxima, averages = values.get(f"max{i}", []), values.get(f"avg{i}", [])
                    p95 = max(maxima) / 1000.0 if maxima else None
                    p50 = (sum(averages) / len(averages)) / 1000.0 if averages else None
            rows.append(VariantMetrics(variant, calls, errors, p50, p95, round(window, 1)))
        return rows

    @staticmethod
    def _dims(endpoint: str, variant: str) -> list[dict[str, str]]:
        return [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]

    def _percentiles(
        self, endpoint: str, variant: str, start: dt.datetime, end: dt.datetime
    ) -> tuple[float | None, float | None]:
        span = max(60, int((end - start).total_seconds() // 60 + 1) * 60)
        try:
            found = self.client("cloudwatch").get_metric_statistics(
                Namespace=R.NAMESPACE,
                MetricName="ModelLatency",
                Dimensions=self._dims(endpoint, variant),
                StartTime=start,
                EndTime=end,
                Period=span,
                ExtendedStatistics=["p50", "p95"],
            )
        except Exception:  # a CloudWatch without percentiles (or a stand-in): the caller falls back to Maximum
            return None, None
        points = [p.get("ExtendedStatistics") or {} for p in found.get("Datapoints", [])]
        p95 = [float(p["p95"]) for p in points if "p95" in p]
        p50 = [float(p["p50"]) for p in points if "p50" in p]
        if not p95:
            return None, None
        return (max(p50) / 1000.0 if p50 else None), max(p95) / 1000.0

    # -- endings -----------------------------------------------------------------------------------------------
    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        endpoint = handle.endpoint_name
        ep = self._describe_endpoint(endpoint)
        if ep is None:
            raise DeploymentError(f"endpoint {endpoint} does not exist; nothing to roll back")
        if ep.get("EndpointStatus") in _BUSY:
            if handle.extra.get("pending_config"):
                self._abort_guarded(endpoint, failed_variant)  # SageMaker rolls its blue/green update back itself
            ep = self._wait(endpoint, what=f"rolling back {failed_variant}")
        current = self._variants(ep)
        if any(v.name == failed_variant for v in current):
            keep = [replace(v, weight=float(previous.get(v.name, 0.0))) for v in current if v.name in previous]
            if not keep:
                raise DeploymentError(
                    f"endpoint {endpoint}: none of the previous variants {sorted(previous)} is on the endpoint now "
                    f"(it has {[v.name for v in current]}); {failed_variant} left serving"
                )
            if any(v.name == failed_variant and not v.shadow for v in current):
                # Traffic back first (seconds), then the fleet change (minutes on SageMaker).
                self.set_traffic(handle, {**{v.name: v.weight for v in keep}, failed_variant: 0.0})
            self._switch(endpoint, keep, what=f"removing {failed_variant}")
        plan = RolloutPlan.parse(handle.extra.get("plan") or {})
        for name, weight in previous.items():  # what serves again scales again (a guarded update removed it)
            if weight > 0:
                self._autoscale(endpoint, name, plan)
        self._delete_alarms(endpoint, failed_variant)
        self._cleanup(endpoint)

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        endpoint = handle.endpoint_name
        ep = self._wait(endpoint, what=f"finishing the rollout of {new_variant}")
        current = self._variants(ep)
        plan = RolloutPlan.parse(handle.extra.get("plan") or {})
        if keep_new:
            new = next((v for v in current if v.name == new_variant and not v.shadow), None)
            if new is None:
                raise DeploymentError(f"endpoint {endpoint} does not serve {new_variant}; cannot promote it")
            for old in current:
                if old.name != new_variant:
                    self._unscale(endpoint, old.name)
            if len(current) > 1:
                self._switch(endpoint, [replace(new, weight=100.0)], what=f"promoting {new_variant}")
            self._autoscale(endpoint, new_variant, plan)
        else:
            self._switch(endpoint, [v for v in current if not v.shadow], what=f"removing the shadow {new_variant}")
        self._delete_alarms(endpoint, new_variant)
        self._cleanup(endpoint)

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        ep = self._describe_endpoint(handle.endpoint_name)
        if ep is None:
            return {"status": "missing", "weights": {}, "variants": []}
        variants = self._variants(ep)
        return {
            "status": ep.get("EndpointStatus"),
            "config": ep.get("EndpointConfigName"),
            "weights": R.percent({v.name: v.weight for v in variants if not v.shadow}),
            "variants": [{**asdict(v)} for v in variants],
            "data_capture": (ep.get("DataCaptureConfig") or {}).get("DestinationS3Uri"),
            "console_url": handle.console_url,
        }

    # -- the rollout record: an S3 object under the settings' prefix ----------------------------------------------
    def _record_location(self, endpoint: str) -> tuple[str, str]:
        self.settings.require("s3_prefix")
        bucket, _, key = self.settings.s3("endpoints", validate_endpoint_name(endpoint), "rollout.json")[5:].partition(
            "/"
        )
        return bucket, key

    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None:
        bucket, key = self._record_location(endpoint_name)
        try:
            body = self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            if "NoSuchKey" in str(err) or "404" in str(err) or "Not Found" in str(err):
                return None
            raise
        return RolloutRecord.from_dict(json.loads(body))

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None:
        bucket, key = self._record_location(endpoint_name)
        record.updated_at = time.time()
        body = json.dumps(record.to_dict(), indent=2, sort_keys=True).encode()
        self.client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")

    # -- guarded (blue/green with alarm rollback) ------------------------------------------------------------------
    def start_guarded_deployment(self, handle: EndpointHandle, *, variant: str, plan: RolloutPlan) -> None:
        endpoint, pending = handle.endpoint_name, str(handle.extra.get("pending_config") or "")
        if not pending:
            raise DeploymentError(f"{variant} was not deployed for a guarded rollout (deploy with native_guardrails)")
        ep = self._describe_endpoint(endpoint) or {}
        if ep.get("EndpointConfigName") == pending or ep.get("EndpointStatus") in _BUSY:
            return  # started already (a retry): watch it
        for current in self._variants(ep):  # SageMaker replaces the fleet: their scalable targets go first
            self._unscale(endpoint, current.name)
        cw = self.client("cloudwatch")
        for alarm in R.slo_alarms(endpoint, variant, plan):
            cw.put_metric_alarm(**alarm)
        names = R.alarm_names(endpoint, variant)
        self.client("sagemaker").update_endpoint(
            EndpointName=endpoint,
            EndpointConfigName=pending,
            DeploymentConfig={
                "BlueGreenUpdatePolicy": R.guarded_policy(plan),
                "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": n} for n in names.values()]},
            },
        )

    def guarded_deployment_state(self, handle: EndpointHandle, *, variant: str) -> tuple[str, str]:
        endpoint, pending = handle.endpoint_name, str(handle.extra.get("pending_config") or "")
        ep = self._describe_endpoint(endpoint)
        if ep is None:
            return "rolled_back", f"endpoint {endpoint} disappeared during the guarded deployment of {variant}"
        status = ep.get("EndpointStatus")
        if status in _BUSY:
            return "in_progress", f"SageMaker is {status} (blue/green deployment of {variant})"
        if status != "InService":
            return "rolled_back", f"endpoint {endpoint} is {status}: {ep.get('FailureReason', '')}"
        if ep.get("EndpointConfigName") == pending:
            return "succeeded", f"SageMaker's blue/green deployment finished: {variant} serves all traffic"
        # SageMaker says nothing more than this: the update ended and the old config still serves.
        fired = self._alarms_in_alarm(endpoint, variant)
        why = f"alarms in ALARM: {', '.join(fired)}" if fired else "no alarm in ALARM any more"
        return "rolled_back", f"SageMaker rolled the deployment of {variant} back ({why}); the previous config serves"

    def _alarms_in_alarm(self, endpoint: str, variant: str) -> list[str]:
        names = list(R.alarm_names(endpoint, variant).values())
        found = self.client("cloudwatch").describe_alarms(AlarmNames=names)
        return sorted(a["AlarmName"] for a in found.get("MetricAlarms", []) if a.get("StateValue") == "ALARM")

    def _abort_guarded(self, endpoint: str, variant: str) -> None:
        name = R.alarm_names(endpoint, variant)["abort"]
        cw = self.client("cloudwatch")
        cw.put_metric_data(
            Namespace=R.ABORT_NAMESPACE,
            MetricData=[{"MetricName": "RolloutAbort", "Dimensions": self._dims(endpoint, variant), "Value": 1.0}],
        )
        try:
            cw.set_alarm_state(AlarmName=name, StateValue="ALARM", StateReason="airflow-llmops rollout aborted")
        except Exception as err:
            if not _missing(err) and "ResourceNotFound" not in str(err):
                raise

    def _delete_alarms(self, endpoint: str, variant: str) -> None:
        self.client("cloudwatch").delete_alarms(AlarmNames=list(R.alarm_names(endpoint, variant).values()))

    # -- autoscaling ---------------------------------------------------------------------------------------------
    @staticmethod
    def _resource(endpoint: str, variant: str) -> str:
        return f"endpoint/{endpoint}/variant/{variant}"

    def _autoscale(self, endpoint: str, variant: str, plan: RolloutPlan) -> None:
        spec = plan.autoscaling
        if spec is None:
            return
        aas = self.client("application-autoscaling")
        target = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": self._resource(endpoint, variant),
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        }
        aas.register_scalable_target(**target, MinCapacity=spec.min_instances, MaxCapacity=spec.max_instances)
        aas.put_scaling_policy(
            **target,
            PolicyName=f"llmops-{endpoint}-{variant}-invocations",
            PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": spec.target_invocations_per_instance,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                "ScaleInCooldown": spec.scale_in_cooldown_s,
                "ScaleOutCooldown": spec.scale_out_cooldown_s,
            },
        )

    def _unscale(self, endpoint: str, variant: str) -> None:
        """SageMaker refuses to remove a variant that has a scalable target: deregister it first."""
        aas = self.client("application-autoscaling")
        resource = self._resource(endpoint, variant)
        found = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
        for target in found.get("ScalableTargets", []):
            aas.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=target["ScalableDimension"]
            )

    def scaling(self, endpoint: str, variant: str) -> dict[str, Any]:
        """The variant's scalable target and policies (for tests and the UI)."""
        aas = self.client("application-autoscaling")
        resource = self._resource(endpoint, variant)
        targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
        policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)
        return {"targets": targets.get("ScalableTargets", []), "policies": policies.get("ScalingPolicies", [])}

    # -- housekeeping ------------------------------------------------------------------------------------------
    def _owned(self, kind: str, endpoint: str) -> list[str]:
        """Names of our endpoint configs or models of ``endpoint`` (by their tag, not by name prefix)."""
        sm = self.client("sagemaker")
        lister, key, arn_key = {
            "config": ("list_endpoint_configs", "EndpointConfigs", "EndpointConfigArn"),
            "model": ("list_models", "Models", "ModelArn"),
        }[kind]
        name_key = "EndpointConfigName" if kind == "config" else "ModelName"
        out = []
        for item in getattr(sm, lister)(NameContains=endpoint[:40], MaxResults=100).get(key, []):
            tags = sm.list_tags(ResourceArn=item[arn_key]).get("Tags", [])
            if {"Key": R.TAG_ENDPOINT, "Value": endpoint} in tags:
                out.append(str(item[name_key]))
        return out

    def _cleanup(self, endpoint: str) -> None:
        """Delete configs and models of ``endpoint`` that its current config no longer uses (best effort)."""
        ep = self._describe_endpoint(endpoint)
        if ep is None or ep.get("EndpointStatus") != "InService":
            return
        sm = self.client("sagemaker")
        used = {v.model for v in self._variants(ep)}
        for config in self._owned("config", endpoint):
            if config != ep["EndpointConfigName"]:
                sm.delete_endpoint_config(EndpointConfigName=config)
        for model in self._owned("model", endpoint):
            if model not in used:
                sm.delete_model(ModelName=model)

    def stop_endpoint(self, endpoint_name: str) -> None:
        """Delete the endpoint, its configs and models (the rollout record in S3 stays, as history)."""
        endpoint = validate_endpoint_name(endpoint_name)
        sm = self.client("sagemaker")
        ep = self._describe_endpoint(endpoint)
        if ep is not None:
            for v in self._variants(ep):
                self._unscale(endpoint, v.name)
            sm.delete_endpoint(EndpointName=endpoint)
        for config in self._owned("config", endpoint):
            sm.delete_endpoint_config(EndpointConfigName=config)
        for model in self._owned("model", endpoint):
            sm.delete_model(ModelName=model)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

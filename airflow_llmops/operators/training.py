"""TrainModelOperator: run a training job on a platform, follow it, and hand the model on."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_llmops.links.artifacts import CloudConsoleLink
from airflow_llmops.links.mlflow import MLflowRunLink, mlflow_run_url
from airflow_llmops.operators.base import LLMOpsBaseOperator, airflow_home, cloud_platform_kwargs, is_remote
from airflow_llmops.platforms.base import JobHandle, JobState, JobStatus
from airflow_llmops.specs import SpecValidationError, TrainingSpec

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_llmops.platforms.base import TrainingPlatform


def default_mlflow_tracking_uri() -> str:
    return conf.get("llmops", "mlflow_tracking_uri", fallback="") or os.environ.get("MLFLOW_TRACKING_URI", "")


def default_local_jobs_root() -> str:
    configured = conf.get("llmops", "local_jobs_root", fallback="")
    if configured:
        return configured
    return os.path.join(airflow_home(), "llmops", "jobs")


class TrainModelOperator(LLMOpsBaseOperator):
    """Train a model with a :class:`TrainingSpec` on ``platform`` and return its URI and key metrics.

    The job is named after (dag_id, run_id, task_id), so a retry re-attaches to a job that is still running,
    and a job that crashed restarts in the same place and resumes from its newest checkpoint. While it runs
    the task log shows its progress every ``progress_interval`` seconds; with ``deferrable=True`` the wait
    moves to the triggerer and frees the worker slot. Killing the task stops the whole job.

    :param spec: :class:`TrainingSpec` (or a mapping / JSON of one; templated).
    :param dataset_uri: prepared dataset folder, overriding ``spec.dataset_uri`` (templated).
    :param mlflow_tracking_uri: MLflow server for params, metrics and the model (templated); default
        ``[llmops] mlflow_tracking_uri`` or ``$MLFLOW_TRACKING_URI``; empty: no tracking.
    :param poll_interval: seconds between status checks.
    :param progress_interval: seconds between progress lines in the task log.
    :param deferrable: wait in the triggerer instead of the worker.
    :param platform_options: the cloud adapter's settings (sagemaker: ``role_arn``, ``image_uri``, ``s3_prefix``,
        ``instance_type``, ``max_runtime_s``...; JSON values, never credentials: those stay in ``platform_conn_id``).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "spec",
        "dataset_uri",
        "mlflow_tracking_uri",
        "jobs_root",
        "platform_options",
    )
    operator_extra_links = (MLflowRunLink(), CloudConsoleLink())
    ui_color = "#f0e6ff"

    def __init__(
        self,
        *,
        spec: TrainingSpec | Mapping[str, Any] | str | None = None,
        dataset_uri: str | None = None,
        mlflow_tracking_uri: str | None = None,
        jobs_root: str | None = None,
        poll_interval: float = 5.0,
        progress_interval: float = 30.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        timeout: timedelta | None = None,
        platform_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.platform_options = dict(platform_options or {})
        self.spec = spec
        self.dataset_uri = dataset_uri
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.jobs_root = jobs_root
        self.poll_interval = poll_interval
        self.progress_interval = progress_interval
        self.deferrable = deferrable
        self.timeout = timeout
        self._handle: JobHandle | None = None

    # -- pieces --------------------------------------------------------------------------------------------
    def training_spec(self) -> TrainingSpec:
        try:
            spec = TrainingSpec.parse(self.spec or {})
        except SpecValidationError as err:
            raise AirflowFailException(str(err)) from None
        dataset = str(self.dataset_uri or spec.dataset_uri or "")
        if not dataset:
            raise AirflowFailException(f"{self.task_id}: no dataset; set dataset_uri or spec.dataset_uri")
        if is_remote(dataset) and self.platform == "local":
            # torchrun's processes read a local folder and hold no cloud credentials: stage the dataset on this
            # machine through the artifact connection (a retry that restarts the job stages it again).
            dataset = str(self.stage_in(dataset, "dataset"))
        return spec.model_copy(update={"dataset_uri": dataset.removeprefix("file://")})

    def platform_kwargs(self) -> dict[str, Any]:
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        env = {"MLFLOW_TRACKING_URI": tracking} if tracking else {}
        if self.check_platform() != "local":
            return cloud_platform_kwargs(self.platform, self.platform_conn_id, self.platform_options, env=env)
        return {"jobs_root": self.jobs_root or default_local_jobs_root(), "env": env, **self.platform_options}

    def platform_adapter(self) -> TrainingPlatform:
        from airflow_llmops.platforms import training_platform

        try:
            return training_platform(self.check_platform(), **self.platform_kwargs())
        except ValueError as err:
            raise AirflowFailException(str(err)) from None

    # -- execution -----------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.training_spec()
        platform = self.platform_adapter()
        try:
            handle = platform.submit_training(spec, job_name=self.job_name(context))
        except ValueError as err:  # a setting the platform refuses before any job starts
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        self._handle = handle
        context["ti"].xcom_push(key="job", value=handle.to_dict())
        if handle.console_url:
            CloudConsoleLink().persist(context, handle.console_url)
        self.log.info("Training job %s on %s (%s)", handle.job_name, platform.name, handle.extra or handle.job_id)
        # A job that already ended (a retry re-attaching to a finished job) needs no trigger: one that fires at once
        # races the scheduler (apache/airflow#71580).
        current = platform.get_training_status(handle)
        if current.state.is_terminal:
            return self._finish(context, platform, handle, current)
        if self.deferrable:
            from airflow_llmops.triggers.training import TrainingJobTrigger

            self.defer(
                trigger=TrainingJobTrigger(
                    platform=platform.name,
                    platform_kwargs=self.platform_kwargs(),
                    handle=handle.to_dict(),
                    poll_interval=self.poll_interval,
                    timeout=self.timeout.total_seconds() if self.timeout else None,
                ),
                method_name="execute_complete",
            )
        status = self._wait(platform, handle)
        return self._finish(context, platform, handle, status)

    def _wait(self, platform: TrainingPlatform, handle: JobHandle) -> JobStatus:
        from airflow_llmops.triggers.training import progress_line

        started = last_log = time.monotonic()
        while True:
            status = platform.get_training_status(handle)
            if status.state.is_terminal:
                return status
            now = time.monotonic()
            if now - last_log >= self.progress_interval:
                self.log.info("%s: %s", handle.job_name, progress_line(status))
                last_log = now
            if self.timeout and now - started > self.timeout.total_seconds():
                platform.cancel_training(handle)
                raise AirflowException(f"training job {handle.job_name} did not finish within {self.timeout}")
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        handle = JobHandle.from_dict(event["handle"])
        if event["status"].get("state") == "timeout":
            self.platform_adapter().cancel_training(handle)
            raise AirflowException(f"training job {handle.job_name}: {event['status'].get('message')}")
        return self._finish(context, self.platform_adapter(), handle, JobStatus.from_dict(event["status"]))

    def _finish(
        self, context: Context, platform: TrainingPlatform, handle: JobHandle, status: JobStatus
    ) -> dict[str, Any]:
        details = platform.describe_training(handle)
        final = details.get("status") or {}
        if status.state is not JobState.SUCCEEDED:
            # Retryable: the retry re-attaches to the same job folder and resumes from its checkpoints.
            raise AirflowException(f"training job {handle.job_name} {status.state.value}: {status.message}")
        run_id = final.get("mlflow_run_id")
        tracking = self.platform_kwargs().get("env", {}).get("MLFLOW_TRACKING_URI", "")
        experiment_id = (details.get("mlflow") or {}).get("experiment_id")
        url = mlflow_run_url(tracking, experiment_id, run_id) if run_id else None
        if url:
            MLflowRunLink().persist(context, url)
        self.log.info("Model %s; metrics %s", status.model_uri, status.metrics)
        return {
            "model_uri": status.model_uri,
            "metrics": status.metrics,
            "job_name": handle.job_name,
            "mlflow_run_id": run_id,
            "resumed_from_step": final.get("resumed_from_step"),
        }

    def on_kill(self) -> None:
        if self._handle is not None:
            self.log.info("Stopping training job %s", self._handle.job_name)
            self.platform_adapter().cancel_training(self._handle)
